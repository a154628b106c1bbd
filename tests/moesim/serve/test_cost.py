"""The iteration-cost adapter: KV and weight bytes by hand, attention work against the training core,
the interpolation grid, the roofline lower bound and the layout errors."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwmodels.roofline import RooflineCost
from hwmodels.specs import load_system
from moesim.serve.cost import (BatchWork, IterationCost, ServeError, ServeLayout, interpolation_error, pool_system,
                               two_batch_makespan)
from moesim.train.layers import Shape, core_attention_kernels
from moesim.train.step import model_flops_per_micro_batch
from workloads.hf_config import load_config


@pytest.fixture(scope="module")
def mixtral():
    return load_config("mixtral-8x7b")


@pytest.fixture(scope="module")
def dgx():
    return load_system("dgx-h100")


def test_kv_bytes_by_hand(mixtral, dgx):
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8))
    # 32 layers x (K and V) x 8 kv heads x 128 head dim x 2 bytes
    assert ic.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2 == ic.kv_bytes_per_token_model
    ic8 = IterationCost(mixtral, dgx, ServeLayout(tp=8, ep=8, dp=1))
    assert ic8.kv_bytes_per_token == 32 * 2 * 1 * 128 * 2  # one kv head per device
    ds = load_config("deepseek-v3")
    ic_ds = IterationCost(ds, dgx.with_nodes(8), ServeLayout(tp=1, ep=64, dp=64), dtype="fp8")
    assert ic_ds.kv_bytes_per_token == 61 * (512 + 64) * 1  # MLA latent + rope key, fp8


def test_weights_by_hand(mixtral, dgx):
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8))
    h, v, f, layers = 4096, 32000, 14336, 32
    attn = h * (32 * 128 + 2 * 8 * 128) + 32 * 128 * h
    per_layer = attn + 2 * h + 8 * h + 8 / 8 * 3 * h * f  # norms, router, one expert per device
    params = 2 * v * h + h + layers * per_layer  # embedding, head, final norm
    assert ic.weight_bytes_per_device == pytest.approx(params * 2)
    cap = (dgx.device.main_memory.capacity_bytes * 0.9 - params * 2) // ic.kv_bytes_per_token
    assert ic.kv_capacity_tokens_per_device == cap
    assert ic.kv_capacity_blocks(16) == cap // 16  # one data-parallel rank (tp 1: one device)


def test_attention_work_of_a_whole_prompt_is_the_training_core(mixtral, dgx):
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=2, ep=8, dp=4))
    s = 1000
    k = ic.attention_kernel(pairs=s * 0 + 0.5 * s * s, kv_read=s, tokens=s)
    train = core_attention_kernels(mixtral, Shape(1, s, 2), 2)[0]
    assert k.flops == pytest.approx(train.flops)


def test_linear_is_exact_on_the_grid_and_interpolates_between(mixtral, dgx):
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8), exact_up_to=16, grid_ratio=1.5)
    grid = ic._grid_upto(2000)
    for t in (1, 7, 16, grid[20]):
        assert ic.linear_s(t) == ic.linear_exact_s(t)
    lo, hi = grid[18], grid[19]
    mid = (lo + hi) // 2
    assert min(ic.linear_s(lo), ic.linear_s(hi)) <= ic.linear_s(mid) <= max(ic.linear_s(lo), ic.linear_s(hi))


def test_refined_interpolation_stays_within_its_tolerance(mixtral, dgx):
    """Even from a coarse grid (ratio 1.5), the refinement keeps linear(T) near the exact value at random T."""
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8), exact_up_to=16, grid_ratio=1.5)
    tokens = np.random.default_rng(0).integers(17, 2000, 30)
    err = interpolation_error(ic, tokens)
    assert np.all(np.abs(err) <= ic.interp_tol), err


@pytest.mark.parametrize("tokens", [1, 64, 700, 4096])
def test_prefill_time_above_the_flops_bound(mixtral, dgx, tokens):
    """A whole prompt in one iteration cannot beat the model's forward FLOPs at the peak of every device."""
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8), cost=RooflineCost())
    w = BatchWork(tokens=tokens, sampled=1, attention_pairs=0.5 * tokens * tokens, kv_tokens_read=tokens)
    bound = model_flops_per_micro_batch(mixtral, 1, tokens) / (dgx.device.peak("bf16") * dgx.num_devices)
    assert ic.iteration_s(w) >= bound


def test_more_tokens_take_longer(mixtral, dgx):
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8))
    times = [ic.iteration_s(BatchWork(t, t, t * 500.0, t * 500.0)) for t in (8, 64, 512, 4096)]
    assert times == sorted(times) and times[0] > 0


def test_layout_errors(mixtral, dgx):
    with pytest.raises(ServeError, match="= 4 devices, but system .dgx-h100. has 8"):
        IterationCost(mixtral, dgx, ServeLayout(tp=2, ep=2, dp=2))
    with pytest.raises(ServeError, match="must divide tp x dp"):
        ServeLayout(tp=1, ep=3, dp=8)
    with pytest.raises(ServeError, match="does not fit.*raise --tp or --ep"):
        IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=1, dp=8))
    with pytest.raises(ServeError, match="needs an MoE model"):
        IterationCost(load_config("llama-3.1-70b"), dgx, ServeLayout(tp=1, ep=2, dp=8))


def test_pool_system(dgx):
    two = dgx.with_nodes(2)
    assert pool_system(two, 4).num_devices == 4 and pool_system(two, 16).num_nodes == 2
    with pytest.raises(ServeError, match="does not fit"):
        pool_system(two, 17)


def test_two_batch_makespan_by_hand():
    """One layer, A=1, D=2, E=1, C=2: compute A1 [0,1] A2 [1,2]; comm D1 [1,3] D2 [3,5]; compute E1 [3,4]
    E2 [5,6]; comm C1 [5,7] C2 [7,9]."""
    one = np.ones(1)
    assert two_batch_makespan(one, 2 * one, one, 2 * one) == 9.0


@given(st.lists(st.tuples(*[st.floats(0, 10, allow_nan=False)] * 4), min_size=1, max_size=6))
def test_two_batch_makespan_bounds(layers):
    a, d, e, c = (np.array(x) for x in zip(*layers))
    span = two_batch_makespan(a, d, e, c)
    # no faster than either stream's work, no slower than running everything in series
    assert span >= 2 * max((a + e).sum(), (d + c).sum()) - 1e-9
    assert span <= 2 * (a + d + e + c).sum() + 1e-9
    if not (d + c).any():  # nothing to overlap: the two halves run back to back
        assert span == pytest.approx(2 * (a + e).sum())


def test_two_batch_overlap_without_all_to_all_is_two_half_passes(dgx):
    """A dense model has no dispatch or combine: the overlapped iteration is two half-size passes."""
    cfg = load_config("llama-3.1-70b")
    ic = IterationCost(cfg, dgx, ServeLayout(tp=8, ep=1, dp=1), two_batch_overlap=True)
    w = BatchWork(tokens=512, sampled=0, attention_pairs=512 * 300.0, kv_tokens_read=512 * 300.0)
    half = ic.linear_exact_s(256) + ic.attention_s(w.attention_pairs / 2, w.kv_tokens_read / 2, 256)
    assert ic.iteration_s(w) == pytest.approx(2 * half)


def test_two_batch_overlap_hides_cross_node_all_to_all(dgx):
    """DeepSeek-V3 (fp8) over 8 nodes, EP 64, 256 tokens per rank: the cross-node all-to-alls are long enough
    that hiding them behind the other micro-batch's compute beats running the whole batch at once."""
    cfg, system = load_config("deepseek-v3"), dgx.with_nodes(8)
    times = {}
    for tbo in (False, True):
        ic = IterationCost(cfg, system, ServeLayout(tp=1, ep=64, dp=64), dtype="fp8", two_batch_overlap=tbo)
        t = 256
        times[tbo] = ic.iteration_s(BatchWork(t * 64, t * 64, t * 64 * 2000.0, t * 64 * 2000.0))
    assert times[True] < times[False]


def test_ranks_in_lock_step(mixtral, dgx):
    """Eight equal ranks take as long as the pooled batch split evenly; an unequal split takes the busiest
    rank's time."""
    ic = IterationCost(mixtral, dgx, ServeLayout(tp=1, ep=8, dp=8))
    one = BatchWork(64, 8, 64 * 700.0, 64 * 700.0)
    assert ic.ranks_iteration_s([one] * 8) == pytest.approx(ic.iteration_s(BatchWork(512, 64, 8 * 64 * 700.0,
                                                                                    8 * 64 * 700.0)))
    busy = BatchWork(256, 8, 256 * 700.0, 256 * 700.0)
    assert ic.ranks_iteration_s([one] * 7 + [busy]) == pytest.approx(ic.rank_s(busy))
