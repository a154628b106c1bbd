"""Closed-form checks of what each device computes and sends (the outlier investigation of issue 13): tokens per
device with tensor and expert parallel, expert FLOPs, all-to-all bytes, and the attention core's backward."""

from __future__ import annotations

import pytest

from hwmodels.cost import GpuFittedCost, RooflineCost
from hwmodels.specs import load_system
from moesim.train.layers import FA_BACKWARD_FLOPS_RATIO, Shape, block_ops
from moesim.train.moe import moe_times
from moesim.train.ops import FORWARD, Timer
from moesim.train.spec import Parallel, TrainSpec
from tests.moesim.train.conftest import flame_config


@pytest.mark.parametrize("tp,ep", [(1, 8), (2, 8), (4, 8), (2, 4)])
def test_tokens_expert_flops_and_dispatch_bytes_per_device(tp, ep):
    cfg, seq = flame_config(), 4096
    spec = TrainSpec(Parallel(tp=tp, dp=8 // tp, ep=ep), seq_len=seq, micro_batch_size=1, global_batch_size=8 // tp,
                     dispatch_dedup="none")  # one copy per (token, expert): the closed form below
    mt = moe_times(cfg, load_system("dgx-h100"), spec, RooflineCost(), None)
    t = seq // tp  # sequence-parallel shard: each device routes its own tokens, none twice
    choices = t * cfg.num_experts_per_tok  # balanced: a device computes as many choices as it sends
    h, f = cfg.hidden_size, cfg.moe_intermediate_size
    assert mt.tokens_per_device == t
    assert mt.expert_tokens_max[0, 0] == choices
    assert mt.expert_flops[0, 0] == pytest.approx(choices * 2 * 3 * h * f)  # gate, up, down
    assert mt.dispatch_sent_bytes[0, 0] == pytest.approx(choices * (ep - 1) / ep * h * 2)  # bf16, off-device share


def test_attention_core_backward_is_two_and_a_half_forwards_at_the_forwards_efficiency():
    system = load_system("dgx-h100")
    timer = Timer(GpuFittedCost(), system.device, "bf16")
    ops = [o for o in block_ops(flame_config(), 1, Shape(1, 4096, 1), timer, system) if o.phase == "attention_core"]
    fwd = next(o for o in ops if o.direction == FORWARD)
    bwd = next(o for o in ops if o.direction != FORWARD)
    assert bwd.flops == pytest.approx(FA_BACKWARD_FLOPS_RATIO * fwd.flops)
    assert bwd.time_s == pytest.approx(FA_BACKWARD_FLOPS_RATIO * fwd.time_s)  # FLOP/s of backward = forward's
