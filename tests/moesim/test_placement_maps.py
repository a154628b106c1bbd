import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.placement import Placement, PlacementError, contiguous


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_maps_are_mutually_inverse(data):
    e = data.draw(st.integers(1, 12))
    d = data.draw(st.integers(1, 4))
    spd = data.draw(st.integers(-(-e // d), -(-e // d) + 3))
    rng = np.random.default_rng(data.draw(st.integers(0, 10**6)))
    row = np.full(spd * d, -1)
    slots = rng.permutation(spd * d)
    row[slots[:e]] = np.arange(e)  # every expert once
    extra = rng.integers(0, spd * d - e + 1)
    row[slots[e:e + extra]] = rng.integers(0, e, size=extra)  # replicas
    p = Placement.from_slot_to_expert(row[None, :], e, spd)
    for expert in range(e):
        slots_e = p.expert_to_slots[0, expert]
        slots_e = slots_e[slots_e >= 0]
        assert len(slots_e) == p.replica_count[0, expert] >= 1
        assert (p.slot_to_expert[0, slots_e] == expert).all()
    assert p.replica_count.sum() == (p.slot_to_expert >= 0).sum()


def test_contiguous_layout():
    p = contiguous(2, 64, 8)
    assert p.slots_per_device == 8
    assert p.experts_on_device(1, 3).tolist() == list(range(24, 32))


def test_missing_expert_is_rejected():
    with pytest.raises(PlacementError, match="expert 1 of layer 0 has no slot"):
        Placement.from_slot_to_expert(np.array([[0, 0, 2, -1]]), 3, 2)
