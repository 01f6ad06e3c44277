"""The data-frame write that skips h2's copies leaves h2 exactly as its own send_data would."""

from __future__ import annotations

from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.settings import SettingCodes

from trio_dchan.transport._grpc import write_data_frame


class _Capture:
    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


def _connection() -> H2Connection:
    client = H2Connection(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    server.update_settings({SettingCodes.MAX_FRAME_SIZE: 1 << 20})
    client.receive_data(server.data_to_send())
    client.send_headers(
        1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
    )
    client.increment_flow_control_window(1 << 22)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    # Something h2 queued and has not handed out yet must still go first.
    client.ping(b"12345678")
    return client


def _state(h2: Any) -> tuple[int, int, object]:
    return (
        h2.outbound_flow_control_window,
        h2.streams[1].outbound_flow_control_window,
        h2.streams[1].state_machine.state,
    )


@pytest.mark.parametrize("size", [0, 1, 9_000, 60_000])
def test_same_bytes_and_state_as_h2_send_data(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    theirs, ours = _connection(), _connection()
    theirs.send_data(1, data)
    expected = theirs.data_to_send()
    out = _Capture()
    write_data_frame(ours, out, 1, data)
    assert bytes(out.written) == expected
    assert _state(ours) == _state(theirs)
    assert ours.data_to_send() == b""
