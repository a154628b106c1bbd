"""Offloaded serving with expert parallelism: each GPU caches its own experts, fetching misses over its own link."""

import json

import numpy as np
import pytest

from hwmodels.specs import load_system
from moebase.units import GB
from moesim.cli import main
from moesim.serve.cost import pool_system
from moesim.serve.offload import build
from workloads.hf_config import load_config
from workloads.trace import TraceMeta, from_dense

T = 64  # tokens per rank


def _trace(experts_of_token):
    """One layer; token t picks the experts ``experts_of_token(t)`` (a list of equal length for every t)."""
    ids = np.array([experts_of_token(t) for t in range(2 * T)], dtype=np.int32)[:, None, :]
    return from_dense(ids, None, TraceMeta("hand", 64, ids.shape[2], 1, "hand"))


def _cache(trace, ep, experts=4):
    from hwmodels.roofline import DTYPE_BYTES
    from workloads.catalog import swiglu_params
    cfg = load_config("olmoe-1b-7b")
    expert_bytes = swiglu_params(cfg.hidden_size, cfg.moe_intermediate_size) * DTYPE_BYTES["bf16"]
    return build(cfg, pool_system(load_system("dgx-h100"), 2), trace, experts * expert_bytes, "lru", 1, ep, "bf16")


def test_each_gpu_fetches_its_own_misses_concurrently():
    # GPU 0 of the contiguous placement over 2 GPUs holds experts 0..31, GPU 1 experts 32..63; both see the same
    # cyclic pattern over 8 of their experts, the cache holds 4 of them
    both = _cache(_trace(lambda t: [t % 8, 32 + t % 8]), ep=2)
    alone = _cache(_trace(lambda t: [t % 8]), ep=1)  # GPU 0's accesses on one GPU
    assert both.batch_tokens(T) == alone.batch_tokens(2 * T) == 2 * T
    b, a = both.per_batch(T, 0.0), alone.per_batch(2 * T, 0.0)
    assert a["stall_s"] > 0 and a["hits"] < a["accesses"]
    assert b["stall_s"] == pytest.approx(a["stall_s"], rel=1e-12)  # own links: not twice the stall
    assert b["accesses"] == 2 * a["accesses"] and b["hits"] == 2 * a["hits"]
    assert b["bytes_by_path"] == pytest.approx(a["bytes_by_path"])  # per GPU: each moves what one GPU alone moves


def test_a_gpu_without_accesses_fetches_nothing():
    only0 = _cache(_trace(lambda t: [t % 8]), ep=2)  # every choice on GPU 0
    alone = _cache(_trace(lambda t: [t % 8]), ep=1)
    b, a = only0.per_batch(T, 0.0), alone.per_batch(2 * T, 0.0)
    assert b["stall_s"] == pytest.approx(a["stall_s"], rel=1e-12) and b["hits"] == a["hits"]
    assert b["bytes_by_path"] == pytest.approx({k: v / 2 for k, v in a["bytes_by_path"].items()})  # per GPU: mean


def test_cache_with_ep_needs_tp1_and_one_copy_per_expert():
    from moesim.serve import exflow
    cfg, tr = load_config("olmoe-1b-7b"), _trace(lambda t: [t % 8])
    with pytest.raises(ValueError, match="--tp 1"):
        build(cfg, load_system("dgx-h100"), tr, GB, "lru", 2, 4, "bf16")
    replicas = exflow.place(tr, "greedy", 2, 2, num_replicas=8)
    with pytest.raises(ValueError, match="own experts"):
        build(cfg, pool_system(load_system("dgx-h100"), 2), tr, GB, "lru", 1, 2, "bf16", replicas)


def test_cli_offloaded_serving_with_expert_parallelism(tmp_path):
    base = ["serve", "--model", "olmoe-1b-7b", "--system", "dgx-h100", "--trace", "flame-moe-290m",
            "--expert-cache-gb", "0.5", "--rate", "10", "--duration-s", "0.3", "--no-report"]
    assert main([*base, "--ep", "8", "--out", str(tmp_path / "ep")]) == 0
    m = json.loads((tmp_path / "ep" / "metrics.json").read_text())
    c = m["expert_cache"]["colocated"]
    assert m["requests"]["finished"] == m["requests"]["total"] > 0
    assert 0 < c["hit_rate"] < 1 and c["stall_s"] > 0
    assert m["config"]["pools"]["colocated"]["ep"] == 8
