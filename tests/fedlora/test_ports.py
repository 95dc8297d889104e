"""Free ports for launched services: drawn below the ephemeral range, where no
outgoing connection can take one between the draw and the service's bind."""

from __future__ import annotations

import socket

from fedlora import ports


def test_free_ports_are_distinct_bindable_and_outside_ephemeral_and_ray_ranges():
    low, _ = ports.ephemeral_range()
    drawn = ports.free_ports(50)
    assert len(set(drawn)) == 50
    for port in drawn:
        assert 20_000 <= port < low  # Ray's workers bind 10002-19999 on their own
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_free_ports_skip_a_port_in_use_and_a_port_already_drawn(monkeypatch):
    a, b, c = ports.free_ports(3)
    with socket.socket() as held:
        held.bind(("127.0.0.1", a))  # another program's listener
        held.listen()
        offers = iter([a, b, b, a, c])

        class Offers:
            def randrange(self, low: int, high: int) -> int:
                return next(offers)

        monkeypatch.setattr(ports.random, "SystemRandom", Offers)
        assert ports.free_ports(2) == [b, c]


def test_a_port_bound_elsewhere_is_not_bindable():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert not ports._bindable(held.getsockname()[1])


def test_free_ports_fall_back_to_the_kernel_when_the_gap_is_too_small(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (20_500, 60_999))
    drawn = ports.free_ports(3)
    assert len(set(drawn)) == 3 and all(p >= 20_500 for p in drawn)
