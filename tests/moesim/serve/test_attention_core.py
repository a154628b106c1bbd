"""The serving attention core against the training core and the spec: BF16 under FP8 serving (attention keeps its
precision, moesim.train.ops), the training core's GEMM-equivalent time for a whole prompt, the KV read's roofline
for decode."""

import pytest

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.serve.cost import IterationCost, ServeLayout
from moesim.train.layers import Shape, core_attention_kernels
from moesim.train.ops import kernel_cost
from workloads.hf_config import load_config


@pytest.fixture(scope="module")
def v3_ep32():
    cfg, system = load_config("deepseek-v3"), load_system("hgx-h800").with_nodes(4)
    return IterationCost(cfg, system, ServeLayout(tp=1, ep=32, dp=32), dtype="fp8")


def test_fp8_prefill_core_is_never_faster_than_the_bf16_peak(v3_ep32):
    """Two causal 4K prompts: 2 x 4096^2 / 2 pairs x 2 x 128 heads x (192 + 128) FLOPs per layer, 61 layers; at
    the FP8 peak (the error this guards against) the core took half the BF16-peak time."""
    ic, n = v3_ep32, 4096
    pairs = 2 * 0.5 * n * n
    flops = 61 * pairs * 2 * 128 * (192 + 128)
    bf16_peak_s = flops / ic.system.device.peak("bf16")
    assert ic.attention_s(pairs, 2.0 * n, 2 * n) >= bf16_peak_s
    assert ic.attention_s(pairs, 2.0 * n, 2 * n) > 1.5 * flops / ic.system.device.peak("fp8")


def test_whole_prompt_core_takes_the_training_forward_core_time(v3_ep32):
    ic, s = v3_ep32, 4096
    train_fwd = core_attention_kernels(ic.cfg, Shape(1, s, 1), 2)[0]
    expected = kernel_cost(ic.cost, ic.system.device, train_fwd, "bf16").time_s
    assert ic.attention_s(0.5 * s * s, float(s), s) == pytest.approx(61 * expected, rel=1e-9)


def test_decode_core_is_bounded_by_its_kv_read():
    """Roofline cost, DeepSeek-V3 decode of 92 requests x 5120 KV tokens: one layer reads 92 x 5120 x (512 + 64)
    FP8 latent bytes; the core is at least that over the HBM bandwidth, per layer."""
    cfg, system = load_config("deepseek-v3"), load_system("hgx-h800").with_nodes(4)
    ic = IterationCost(cfg, system, ServeLayout(tp=1, ep=32, dp=32), dtype="fp8", cost=RooflineCost())
    b, ctx = 92, 5120
    kv_read_s = b * ctx * (512 + 64) * 1 / system.device.main_memory.bandwidth_bytes_per_s
    assert ic.attention_s(b * (ctx + 0.5), b * (ctx + 1.0), b) >= 61 * kv_read_s
