"""The test helpers' port picker: a port given to a server must still be free when it binds."""

from __future__ import annotations

import socket

from tests import procs


def test_free_ports_are_below_the_range_outgoing_connections_use() -> None:
    """An outgoing connection's local port comes from the ephemeral range; a port from
    there can be taken between the pick and the server's bind (CI run 30), one below it
    cannot. Each is also handed out once, and is free."""
    ephemeral_from = procs._ephemeral_ports_from()
    ports = [procs.free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert not {p + 1000 for p in ports} & set(ports)  # a dev server's default UI port
    assert all(procs.PORTS_FROM <= p <= ephemeral_from - 1001 for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
