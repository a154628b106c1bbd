"""Per-request routing combined with context-coherent expert parallelism and two-batch overlap (the expert cache on
it: test_online_cache.py); per-request routing from the fitted synthetic generator."""

import json

import numpy as np
import pytest

from hwmodels.specs import load_system
from moesim.cli import main
from moesim.serve import exflow
from moesim.serve.cost import BatchWork, IterationCost, ServeLayout, two_batch_makespan
from moesim.serve.routing import RequestRouting, synthetic_rows_trace
from moesim.train.spec import TrainSpec
from workloads.hf_config import load_config
from workloads.importers import load_trace

T = 32  # tokens per device of the hand batches


@pytest.fixture(scope="module")
def flame():
    tr = load_trace("flame-moe-290m")
    return tr, RequestRouting(tr, seed=0), exflow.place(tr, "contiguous", 8, 8)


def _ic(trace, rr, placement, mode="standard", **kw):
    return IterationCost(load_config("olmoe-1b-7b"), load_system("dgx-h100"), ServeLayout(tp=1, ep=8, dp=8),
                         trace=trace, placement=placement, request_routing=rr, ep_mode=exflow.EPMode(mode), **kw)


def test_two_batch_makespan_takes_each_micro_batchs_own_times():
    # one layer, micro-batch 2's dispatch 3 s: A1 0-1, A2 1-2, D1 1-2, D2 2-5, E1 2-3, E2 5-6, C1 5-6, C2 6-7
    assert two_batch_makespan(np.ones((2, 1)), np.array([[1.0], [3.0]]), np.ones((2, 1)), np.ones((2, 1))) == 7.0
    rng = np.random.default_rng(0)
    a, d, e, c = rng.random((4, 5))
    assert two_batch_makespan(a, d, e, c) == two_batch_makespan(*(np.tile(x, (2, 1)) for x in (a, d, e, c)))


def test_coherent_request_routing_replays_the_batchs_rows(flame):
    tr, rr, pl = flame
    rows = (np.arange(8 * T) * 7 + 3) % rr.num_rows  # 8 devices x T tokens: replayed as they are
    coh, std = _ic(tr, rr, pl, "coherent"), _ic(tr, rr, pl, "standard")
    got, base = coh.routed_moe(rows), std.routed_moe(rows)
    assert np.array_equal(got.expert_load, rr.loads(rows))  # the batch's own expert loads: one bincount
    assert np.array_equal(base.expert_load, rr.loads(rows))
    spec = TrainSpec(parallel=coh.layout.parallel(), seq_len=T, micro_batch_size=1, global_batch_size=8,
                     routing="trace", routing_samples=1)
    want = exflow.ep_moe_times(coh.cfg, coh.system, spec, coh.cost, rr.trace(rows), pl, exflow.EPMode("coherent"))
    assert np.array_equal(got.dispatch_s, want.dispatch_s) and np.array_equal(got.combine_s, want.combine_s)
    assert np.array_equal(got.expert_s, base.expert_s)  # only the token movement differs between the modes
    assert not np.array_equal(got.dispatch_s, base.dispatch_s)


def test_two_batch_overlap_gives_each_micro_batch_its_own_rows(flame):
    tr, rr, pl = flame
    ic = _ic(tr, rr, pl, two_batch_overlap=True)
    rows = (np.arange(8 * T) * 5 + 11) % rr.num_rows
    w = BatchWork(tokens=T, sampled=T, attention_pairs=float(T * 50), kv_tokens_read=float(T * 50), routing_rows=rows)
    halves = ic.routed_halves(rows)
    assert np.array_equal(np.sort(np.concatenate(halves)), np.sort(rows))
    mts = [ic.routed_moe(h) for h in halves]
    for h, mt in zip(halves, mts):
        assert np.array_equal(mt.expert_load, rr.loads(h))
    p = ic.layer_parts(T // 2)
    a = p.pre_s + ic.attention_s(w.attention_pairs / 2, w.kv_tokens_read / 2, T / 2) / ic.cfg.num_hidden_layers
    want = 2 * p.embed_s + two_batch_makespan(a, np.stack([m.dispatch_s[0] for m in mts]),
                                              np.stack([p.shared_s + (m.expert_s + m.permute_fwd_s)[0] for m in mts]),
                                              np.stack([m.combine_s[0] for m in mts]))
    assert ic.rank_s(w) == pytest.approx(ic.head_s(T) + want, rel=1e-12)


def test_two_batch_overlap_with_equal_halves_is_the_one_micro_batch_replay(flame):
    tr, rr, pl = flame
    ic = _ic(tr, rr, pl, two_batch_overlap=True)
    half = (np.arange(4 * T) * 3) % rr.num_rows
    rows = np.repeat(half, 2)  # both micro-batches route exactly the rows of `half`
    w = BatchWork(tokens=T, sampled=0, attention_pairs=float(T), kv_tokens_read=float(T), routing_rows=rows)
    mt, p = ic.routed_moe(half), ic.layer_parts(T // 2)
    a = p.pre_s + ic.attention_s(w.attention_pairs / 2, w.kv_tokens_read / 2, T / 2) / ic.cfg.num_hidden_layers
    routed = p.shared_s + (mt.expert_s + mt.permute_fwd_s)[0]  # with the token (un)permute kernels
    one = 2 * p.embed_s + two_batch_makespan(a, mt.dispatch_s[0], routed, mt.combine_s[0])
    assert ic.rank_s(w) == pytest.approx(one, rel=1e-12)


def test_expert_cache_with_request_routing_needs_one_ep_group_or_none(tmp_path, capsys):
    flags = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--trace", "flame-moe-290m", "--ep", "4",
             "--expert-cache-gb", "2", "--request-routing", "--rate", "5", "--duration-s", "0.2", "--no-report",
             "--out", str(tmp_path / "a")]
    assert main(flags) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ep must be 1 or all 8" in err[0] and "Traceback" not in err[0]


def test_synthetic_rows_are_the_generators_in_the_models_shape():
    cfg, src = load_config("olmoe-1b-7b"), load_trace("default")
    a, b, c = (synthetic_rows_trace(cfg, src, 512, seed=s) for s in (1, 1, 2))
    rr = RequestRouting(a)
    assert rr.num_rows == 512 and rr.ids.shape == (512, min(src.meta.num_layers, len(cfg.moe_layers)), 8)
    assert a.meta.num_experts == cfg.num_experts and a.meta.top_k == cfg.num_experts_per_tok
    assert np.array_equal(RequestRouting(b).ids, rr.ids) and not np.array_equal(RequestRouting(c).ids, rr.ids)
    # each token's top-k experts are distinct
    s = np.sort(rr.ids, axis=2)
    assert (s[:, :, 1:] != s[:, :, :-1]).all()
    with pytest.raises(ValueError, match="--synth-tokens"):
        synthetic_rows_trace(cfg, src, 0)


def test_cli_synthetic_request_routing_with_coherent_ep(tmp_path, capsys):
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8", "--rate", "20",
            "--duration-s", "0.3", "--no-report", "--synth-tokens", "2048"]
    assert main([*base, "--request-routing", "synthetic", "--ep-mode", "coherent", "--coherent-kv", "free",
                 "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["config"]["routing"] == "synthetic" and m["config"]["request_routing"] == "synthetic"
    assert m["config"]["pools"]["colocated"]["ep_mode"] == "coherent"
    assert m["requests"]["finished"] == m["requests"]["total"] > 0
    assert main([*base, "--request-routing", "synthetic", "--trace", "flame-moe-290m",
                 "--out", str(tmp_path / "b")]) != 0
    assert "--synth-from" in capsys.readouterr().err
    assert main([*base, "--request-routing", "both", "--trace", "flame-moe-290m", "--out", str(tmp_path / "c")]) != 0
    assert "trace or synthetic" in capsys.readouterr().err
