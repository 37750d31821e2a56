"""The epoch plan's arithmetic: where a resumed round-robin over the streams stands."""

from __future__ import annotations

from alexnet_dist.data.plan import round_robin_position


def test_round_robin_position():
    assert round_robin_position([3, 1], 2) == ([1, 1], 0)
    assert round_robin_position([2, 2, 2], 4) == ([2, 1, 1], 1)
    assert round_robin_position([1, 3], 3) == ([1, 2], 1)
