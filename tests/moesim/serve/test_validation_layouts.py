"""The serving validation's published layouts: DeepSeek-V3 decode at EP144 with 32 redundant experts (288 slots, 2
per GPU) placed by EPLB's global policy, and the checks that let serving run an EP group that does not divide the
experts only with such a placement."""

import numpy as np
import pytest

from moesim.serve import validation as v
from moesim.serve.cost import IterationCost, ServeError, ServeLayout


def _case(name_part: str) -> v.Case:
    return next(c for c in v.CASES if name_part in c.name)


def test_ep144_case_places_256_experts_in_288_slots_two_per_gpu():
    case = _case("DeepSeek online service, decode (EP144, 32 redundant, balanced)")
    ic = v._cost(case)
    pl = ic.placement
    assert (pl.num_devices, pl.slots_per_device, pl.num_slots) == (144, 2, 288)
    copies = (pl.expert_to_slots >= 0).sum(axis=2)  # [layers, experts]
    assert np.all(copies >= 1) and np.all(copies.sum(axis=1) == 288) and np.all((copies == 2).sum(axis=1) == 32)
    # two routed experts per GPU, as EP128 without replicas: the same weight bytes per device
    ref = v._cost(_case("DeepSeek online service, decode (EP128"))
    assert ic.weight_bytes_per_device == pytest.approx(ref.weight_bytes_per_device)
    assert ic.system.num_devices == 144 and ic.layout.ep == 144


def test_ep_not_dividing_the_experts_needs_a_placement():
    case = _case("(EP144, 32 redundant, balanced)")
    ic = v._cost(case)
    with pytest.raises(ServeError, match="--ep 144 must divide the 256 routed experts"):
        IterationCost(ic.cfg, ic.system, ServeLayout(tp=1, ep=144, dp=144), dtype="fp8")


def test_every_decode_case_has_the_published_layout_and_a_reference():
    decode = [c for c in v.CASES if c.phase == "decode"]
    published = [c for c in decode if c.ep == 144]
    assert len(published) == 4 and all(c.redundant_slots == 32 and c.nodes == 18 for c in published)
    assert {c.routing for c in published} == {"balanced", v.SGLANG_DECODE}
    assert all(c.redundant_slots == 0 and c.ep == 128 for c in decode if c not in published)
