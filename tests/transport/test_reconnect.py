"""Reconnecting to a peer that restarted: sign of life ends the backoff early.

The backoff here is long (every delay between 2.5 and 5 s), so a peer that
comes back must be reached through the early retry, well within the smallest
delay the backoff could have picked, not when the backoff happens to end.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
from transport_helpers import RecordingHandler, address_of, bound_socket

from trio_dchan.raft.transport import Proposal, ProposalKind, Unavailable
from trio_dchan.raft.types import Message, MessageType
from trio_dchan.transport import GrpcTransport, TransportSettings, open_transport

LONG = TransportSettings(backoff_initial=5.0, backoff_max=5.0)
#: Half the shortest delay the backoff above can pick (5 s x 0.5).
WITHIN = 1.25


def _rebind(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def _heartbeat(sender: str, to: str, commit: int) -> Message:
    return Message(MessageType.HEARTBEAT, to, sender, 1, commit=commit)


def _restarted(a: str, port: int, b: str, handler: RecordingHandler) -> Any:
    """Node ``a`` coming back on its old port, with ``b`` as its peer."""
    return open_transport(
        a,
        a,
        cluster_id="k",
        peers={b: b},
        sock=_rebind(port),
        settings=LONG,
        raft_handler=handler,
    )


async def _fail_once(tb: GrpcTransport, a: str) -> None:
    """A call from ``tb`` to the unreachable ``a``: ``tb`` backs off from ``a``."""
    with pytest.raises(Unavailable) as info:
        await tb.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
    assert not info.value.maybe_delivered
    assert tb.statistics()[a]["failures"] == 1


async def test_a_peer_that_calls_back_is_reached_without_waiting_out_the_backoff() -> None:
    on_a, on_b = RecordingHandler(), RecordingHandler()
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    port = a_sock.getsockname()[1]
    a_sock.close()  # a is down
    async with open_transport(
        b, b, cluster_id="k", peers={a: a}, sock=b_sock, settings=LONG, raft_handler=on_b
    ) as tb:
        await _fail_once(tb, a)
        async with _restarted(a, port, b, on_a) as ta:
            # The restarted peer speaks first (a vote request, say).
            ta.send([_heartbeat(a, b, 7)])
            with trio.fail_after(WITHIN):
                await on_b.wait_for(1)
                await on_a.resend_until_delivered(tb, _heartbeat(b, a, 8))
            assert on_a.messages[-1].commit == 8


async def test_a_call_that_reaches_the_peer_ends_the_backoff() -> None:
    on_a = RecordingHandler()
    a_sock, b_sock = bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    port = a_sock.getsockname()[1]
    a_sock.close()
    async with open_transport(
        b, b, cluster_id="k", peers={a: a}, sock=b_sock, settings=LONG
    ) as tb:
        await _fail_once(tb, a)
        async with _restarted(a, port, b, on_a):
            with trio.fail_after(WITHIN):
                # A forward does not wait for the Raft pump's backoff; once it
                # went through, the pump knows the peer is back.
                await tb.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
                await on_a.resend_until_delivered(tb, _heartbeat(b, a, 9))
            assert on_a.messages[-1].commit == 9


async def test_calls_from_a_peer_we_cannot_reach_cut_the_backoff_only_once() -> None:
    # b has a wrong address for a (nobody listens there) while a reaches b:
    # a's calls prove a is up, but b's attempts keep failing; they must not
    # turn into one attempt per incoming call.
    dead, a_sock, b_sock = bound_socket(), bound_socket(), bound_socket()
    a, b = address_of(a_sock), address_of(b_sock)
    async with (
        open_transport(
            b,
            b,
            cluster_id="k",
            peers={a: address_of(dead)},
            sock=b_sock,
            settings=LONG,
            raft_handler=RecordingHandler(),
        ) as tb,
        open_transport(a, a, cluster_id="k", peers={b: b}, sock=a_sock, settings=LONG) as ta,
    ):
        call = Proposal(ProposalKind.COMMAND, b"ping")
        with trio.fail_after(WITHIN):
            await _fail_once(tb, a)
            assert tb._peers[a].retry_at > trio.current_time()
            await ta.forward(b, call)
            assert tb._peers[a].retry_at == 0  # the early retry
            await _fail_once_more(tb, a)
            backed_off_until = tb._peers[a].retry_at
            assert backed_off_until > trio.current_time()
            for _ in range(20):
                await ta.forward(b, call)
            assert tb._peers[a].retry_at == backed_off_until


async def _fail_once_more(tb: GrpcTransport, a: str) -> None:
    with pytest.raises(Unavailable):
        await tb.forward(a, Proposal(ProposalKind.COMMAND, b"x"))
    assert tb.statistics()[a]["failures"] == 2
