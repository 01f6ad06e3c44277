"""Mutual TLS between nodes, with certificates made in the test."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme
from transport_helpers import RecordingHandler, address_of, bound_socket

from trio_dchan.raft.transport import Proposal, ProposalKind, Unavailable
from trio_dchan.raft.types import Message, MessageType
from trio_dchan.transport import open_transport


def _contexts(ca: trustme.CA, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Server and client contexts for one node: its cert, trusting only ``ca``, peers verified."""
    cert = ca.issue_cert("127.0.0.1", name)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    ca.configure_trust(server)
    server.verify_mode = ssl.CERT_REQUIRED
    server.set_alpn_protocols(["h2"])
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    cert.configure_cert(client)
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2"])
    return server, client


async def test_mutual_tls_cluster_works_and_a_foreign_ca_is_refused() -> None:
    ca = trustme.CA()
    rogue_ca = trustme.CA()
    socks = [bound_socket() for _ in range(3)]
    a, b, rogue = (address_of(s) for s in socks)
    handler = RecordingHandler(lambda p: p.data.decode())
    a_srv, a_cli = _contexts(ca, "a")
    b_srv, b_cli = _contexts(ca, "b")
    r_srv, r_cli = _contexts(rogue_ca, "rogue")
    peers = {a: a, b: b, rogue: rogue}
    async with (
        open_transport(
            a,
            a,
            cluster_id="k",
            peers=peers,
            sock=socks[0],
            ssl_context=a_srv,
            client_ssl_context=a_cli,
            raft_handler=handler,
        ),
        open_transport(
            b,
            b,
            cluster_id="k",
            peers=peers,
            sock=socks[1],
            ssl_context=b_srv,
            client_ssl_context=b_cli,
        ) as tb,
        open_transport(
            rogue,
            rogue,
            cluster_id="k",
            peers=peers,
            sock=socks[2],
            ssl_context=r_srv,
            client_ssl_context=r_cli,
        ) as tr,
    ):
        with trio.fail_after(10):
            assert await tb.forward(a, Proposal(ProposalKind.COMMAND, b"over tls")) == "over tls"
            await handler.resend_until_delivered(tb, Message(MessageType.HEARTBEAT, a, b, 1))
            # The rogue node's certificate is not from the cluster's CA.
            with pytest.raises(Unavailable):
                await tr.forward(a, Proposal(ProposalKind.COMMAND, b"rogue"))
            tr.send([Message(MessageType.HEARTBEAT, a, rogue, 1, commit=5)])
            # And the cluster's nodes do not accept the rogue's server either.
            with pytest.raises(Unavailable):
                await tb.forward(rogue, Proposal(ProposalKind.COMMAND, b"to rogue"))
            # a still serves b.
            assert await tb.forward(a, Proposal(ProposalKind.COMMAND, b"again")) == "again"
        assert [p.data for p in handler.forwards] == [b"over tls", b"again"]
        assert all(m.sender == b for m in handler.messages)
