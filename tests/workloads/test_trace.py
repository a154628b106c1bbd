import numpy as np
import pytest

from workloads.importers import DEFAULT_TRACE_PATH, FLAME_NPZ, SWITCH_JSON, import_flame_npz, import_switch_json, load_trace
from workloads.trace import TraceError, TraceMeta, from_dense, read_parquet, validate, write_parquet


def test_flame_round_trips_through_parquet_and_matches_npz(shared_traces, tmp_path):
    z = np.load(shared_traces / FLAME_NPZ, allow_pickle=False)
    trace = import_flame_npz(shared_traces / FLAME_NPZ)
    path = write_parquet(trace, tmp_path / "flame.parquet")
    back = read_parquet(path)
    assert back.meta == trace.meta
    for name, col in trace.columns.items():
        np.testing.assert_array_equal(back.columns[name], col)
    load = back.expert_load()
    for layer in range(8):
        np.testing.assert_array_equal(load[layer], np.bincount(z["expert_ids"][:, layer].ravel(), minlength=64))
    experts, weights = back.dense()
    np.testing.assert_array_equal(experts, z["expert_ids"])
    np.testing.assert_array_equal(weights, z["scores"])


def test_embedded_default_equals_the_shared_flame_trace(shared_traces):
    shipped = read_parquet(DEFAULT_TRACE_PATH)
    fresh = import_flame_npz(shared_traces / FLAME_NPZ)
    for name, col in fresh.columns.items():
        np.testing.assert_array_equal(shipped.columns[name], col)
    assert "CMU-FLAME" in shipped.meta.source


def test_default_trace_loads_without_shared_data():
    t = load_trace("default")
    assert (t.meta.num_experts, t.meta.top_k, t.meta.num_layers) == (64, 6, 8)
    assert len(t) == 2048 * 8 * 6 and t.num_tokens == 2048


def test_switch_import(shared_traces):
    t = import_switch_json(shared_traces / SWITCH_JSON)
    assert (t.meta.num_experts, t.meta.top_k, t.meta.num_layers, t.num_tokens) == (8, 1, 6, 215)
    # the README's documented load of block 5 (layer ordinal 2)
    np.testing.assert_array_equal(t.expert_load()[2], [8, 24, 25, 57, 24, 18, 26, 33])
    assert t.columns["sequence"].max() == 9  # 10 prompts


def _tiny(num_experts=4):
    meta = TraceMeta(model="toy", num_experts=num_experts, top_k=2, num_layers=1, source="test")
    return meta, np.array([[[0, 1]], [[2, 3]]])


def test_expert_id_out_of_range_is_rejected():
    meta, ids = _tiny()
    ids[1, 0, 1] = 4
    with pytest.raises(TraceError, match="expert id 4 .* num_experts=4"):
        from_dense(ids, None, meta)


def test_repeated_rank_expert_and_nonfinite_weight_are_rejected():
    meta, ids = _tiny()
    ids[0, 0, 1] = 0
    with pytest.raises(TraceError, match="repeat"):
        from_dense(ids, None, meta)
    meta, ids = _tiny()
    w = np.ones(ids.shape, dtype=np.float32)
    w[1, 0, 0] = np.nan
    with pytest.raises(TraceError, match="not finite"):
        from_dense(ids, w, meta)


def test_truncated_parquet_is_a_clear_error(tmp_path):
    data = DEFAULT_TRACE_PATH.read_bytes()
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="cut.parquet: not a readable Parquet file"):
        read_parquet(bad)


def test_foreign_parquet_is_a_clear_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), path)
    with pytest.raises(TraceError, match="no moesim trace metadata"):
        read_parquet(path)


def test_split_tokens_is_a_partition():
    t = load_trace("default")
    a, b = t.split_tokens(0.5)
    assert len(a) + len(b) == len(t)
    assert a.columns["token"].max() == 1023 and b.columns["token"].min() == 0  # held-out part renumbered
    np.testing.assert_array_equal(b.columns["expert"], t.select(t.columns["token"] >= 1024).columns["expert"])
    validate(a), validate(b)
