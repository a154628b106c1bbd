"""sample_trace's fast path (whole steps, views of contiguous rows) cuts the same rows as the general one."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.train.moe import sample_trace
from workloads import load_table as lt
from workloads.importers import load_trace


def _reference(trace, ep, tokens_per_device, samples, layers):
    """The cut by definition (module docstring of moesim.train.moe): row masks and a modulo, no shortcuts."""
    c = trace.columns
    steps = np.unique(c["step"])
    rows = [np.flatnonzero((c["step"] == s) & (c["layer"] < layers)) for s in steps]
    n_step = min(int(c["token"][r].max()) + 1 for r in rows)
    per = min(tokens_per_device, n_step // ep)
    width = ep * per
    out = {k: [] for k in ("layer", "rank", "expert", "weight", "token", "step")}
    for i in range(samples):
        r = rows[i % len(steps)]
        tok = (c["token"][r] - ((i // len(steps)) * width) % n_step) % n_step
        keep = tok < width
        for k in ("layer", "rank", "expert", "weight"):
            out[k].append(c[k][r[keep]])
        out["token"].append(tok[keep].astype(c["token"].dtype))
        out["step"].append(np.full(int(keep.sum()), i, dtype=c["step"].dtype))
    return {k: np.concatenate(v) for k, v in out.items()}, tokens_per_device / per


@pytest.mark.parametrize("ep,tokens,samples,layers", [(8, 256, 3, 8), (8, 64, 5, 3), (4, 512, 2, 8), (16, 1000, 4, 1)])
def test_fast_cut_equals_the_definition_on_a_one_step_trace(ep, tokens, samples, layers):
    trace = load_trace("default")  # one step of 2048 tokens: whole-step samples take the fast path
    got, scale = sample_trace(trace, ep, tokens, samples, layers)
    want, want_scale = _reference(trace, ep, tokens, samples, layers)
    assert scale == want_scale
    for k, col in want.items():
        assert got.columns[k].dtype == col.dtype
        np.testing.assert_array_equal(got.columns[k], col, err_msg=k)


def test_fast_cut_equals_the_definition_on_a_table_with_steps_of_unequal_tokens():
    counts = np.array([[0, 0, 0, 0], [3, 1, 2, 2], [2, 2, 2, 2]])
    table = lt.load_table_from_counts(counts, top_k=2)
    a, b = lt.expand(table, 6, steps=2, seed=1), lt.expand(table, 4, steps=1, seed=2)
    b.columns["step"][:] = 2
    from workloads.trace import concat
    trace = concat([a, b])
    for ep, tokens, samples in ((2, 2, 5), (2, 1, 7), (4, 1, 3)):
        got, _ = sample_trace(trace, ep, tokens, samples, 2)
        want, _ = _reference(trace, ep, tokens, samples, 2)
        for k, col in want.items():
            np.testing.assert_array_equal(got.columns[k], col, err_msg=k)


@pytest.mark.parametrize("replicas", [False, True])
def test_per_sample_aggregation_is_prepare_on_the_concatenated_samples(replicas):
    from hwmodels.specs import load_system
    from moesim.placement import contiguous
    from moesim.sim import SimOptions, prepare
    from moesim.train.moe import aggregate_samples, sample_steps
    from tests.moesim.train.conftest import flame_config
    from tests.moesim.train.test_moe import _lpt_with_replicas

    trace = load_trace("default")
    system, model = load_system("dgx-h100"), flame_config().to_moe_model()
    placement = _lpt_with_replicas(trace.expert_load(), 8, 10) if replicas else contiguous(8, 64, 8)
    options = SimOptions(micro_batches=1)
    parts, _ = sample_steps(trace, 8, 64, 5, 8)  # 5 windows of 512 tokens: both the view and the copy path
    got = aggregate_samples(system, model, placement, parts, options, seed=3)
    want, _, _ = prepare(system, model, placement, sample_trace(trace, 8, 64, 5, 8)[0], options, 3)
    for name in ("group_key", "pair_tokens", "expert_tokens", "router_tokens"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.num_tokens == want.num_tokens
