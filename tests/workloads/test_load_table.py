"""Expert-load tables (workloads.load_table): validation, exact expansion, apportionment, trace specs."""

from __future__ import annotations

import gzip
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads import load_table as lt
from workloads.importers import find_shared_traces, load_trace

SHARED = find_shared_traces(Path(__file__).resolve().parents[2])
TABLES = sorted((SHARED / "deepseek-v3-expert-loads").glob("*.json.gz")) if SHARED is not None else []
needs_tables = pytest.mark.skipif(not TABLES, reason="shared/data/traces/deepseek-v3-expert-loads is absent "
                                                     "(read from ../shared at run time; not shipped with moesim)")


def _write(tmp_path: Path, doc, name: str = "t.json", gz: bool = False) -> Path:
    path = tmp_path / (name + (".gz" if gz else ""))
    data = json.dumps(doc).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _tokens_of(ids: np.ndarray) -> None:
    """Every token's k experts are distinct."""
    srt = np.sort(ids, axis=-1)
    assert not (srt[..., 1:] == srt[..., :-1]).any()


# ---------------------------------------------------------------- hand-made table

HAND = [[0, 0, 0, 0], [4, 2, 1, 1], [2, 2, 2, 2]]  # row 0 dense; 4 tokens x top-2 in rows 1 and 2


def test_hand_table_expands_exactly(tmp_path):
    path = _write(tmp_path, {"logical_count": HAND})
    table = lt.read_load_table(path, top_k=2)
    assert table.moe_layers == (1, 2) and table.num_tokens == 4 and table.model == "load-table"
    for seed in range(5):
        tr = lt.expand(table, seed=seed)
        assert tr.meta.num_layers == 2 and tr.meta.top_k == 2 and tr.num_tokens == 4
        np.testing.assert_array_equal(tr.expert_load(), [[4, 2, 1, 1], [2, 2, 2, 2]])
        ids, w = tr.dense()
        _tokens_of(ids)
        assert (ids[:, 0] == 0).any(axis=1).all()  # expert 0 has 4 tokens of 4: every token has it
        np.testing.assert_allclose(w, 0.5)


def test_hand_table_scaled_by_hand():
    # 6 tokens x top-2 = 12 selections from [4, 2, 1, 1] (sum 8): quotas 6, 3, 1.5, 1.5 -> floors 6, 3, 1, 1
    # (sum 11); the one left goes to the largest remainder, a tie between experts 2 and 3 -> expert 2
    np.testing.assert_array_equal(lt.apportion(np.array([4, 2, 1, 1]), 12), [6, 3, 2, 1])
    table = lt.load_table_from_counts(np.array(HAND), top_k=2)
    np.testing.assert_array_equal(lt.scaled_counts(table, 6), [[6, 3, 2, 1], [3, 3, 3, 3]])
    tr = lt.expand(table, 6, steps=2, seed=1)
    assert tr.num_steps == 2
    for s in (0, 1):
        np.testing.assert_array_equal(tr.select(tr.columns["step"] == s).expert_load(), [[6, 3, 2, 1], [3, 3, 3, 3]])


# ---------------------------------------------------------------- invariants on generated tables

@st.composite
def tables(draw):
    """A consistent table: layers x experts counts, each row tokens * k in total, every count <= tokens."""
    e = draw(st.integers(2, 12))
    k = draw(st.integers(1, e))
    tokens = draw(st.integers(1, 40))
    layers = draw(st.integers(1, 4))
    rows = []
    for _ in range(layers):
        # deal tokens x k selections: each token picks k distinct experts (a real routing, then counted)
        weights = np.array(draw(st.lists(st.integers(1, 50), min_size=e, max_size=e)), dtype=float)
        seed = draw(st.integers(0, 2**16))
        rng = np.random.default_rng(seed)
        picks = [rng.choice(e, size=k, replace=False, p=weights / weights.sum()) for _ in range(tokens)]
        rows.append(np.bincount(np.concatenate(picks), minlength=e))
    dense_rows = draw(st.integers(0, 2))
    return np.vstack([np.zeros((dense_rows, e), dtype=np.int64), np.array(rows)]), k


@settings(max_examples=60, deadline=None)
@given(tables(), st.integers(0, 2**31 - 1))
def test_expansion_reproduces_any_table(tk, seed):
    counts, k = tk
    table = lt.load_table_from_counts(counts, top_k=k)
    tr = lt.expand(table, seed=seed)
    np.testing.assert_array_equal(tr.expert_load(), counts[counts.sum(axis=1) > 0])
    _tokens_of(tr.dense()[0])


@settings(max_examples=60, deadline=None)
@given(tables(), st.integers(1, 64), st.integers(0, 1000))
def test_scaled_expansion_is_the_apportioned_table(tk, tokens, seed):
    counts, k = tk
    table = lt.load_table_from_counts(counts, top_k=k)
    want = lt.scaled_counts(table, tokens)
    assert (want.sum(axis=1) == tokens * k).all() and want.max() <= tokens
    quota = table.moe_counts * (tokens * k) / table.layer_totals[:, None]
    assert np.abs(want - quota).max() < 1.0  # apportionment: every count within 1 of its exact quota
    tr = lt.expand(table, tokens, seed=seed)
    np.testing.assert_array_equal(tr.expert_load(), want)
    _tokens_of(tr.dense()[0])


@settings(max_examples=40, deadline=None)
@given(tables(), st.integers(1, 64), st.integers(1, 3), st.integers(0, 1000))
def test_expansion_is_the_trace_from_dense_builds_and_valid(tk, tokens, steps, seed):
    """expand builds its columns directly (no sort); they equal from_dense's, and the trace validates."""
    from workloads.trace import from_dense, validate

    counts, k = tk
    tr = lt.expand(lt.load_table_from_counts(counts, top_k=k), tokens, steps=steps, seed=seed)
    validate(tr)
    ids = tr.dense()[0]
    g = np.arange(steps * tokens)
    ref = from_dense(ids, np.full(ids.shape, 1.0 / k, dtype=np.float32), tr.meta, step=(g // tokens).astype(np.int32),
                     token=g % tokens)
    assert tr.columns.keys() == ref.columns.keys()
    for name, col in ref.columns.items():
        assert tr.columns[name].dtype == col.dtype, name
        np.testing.assert_array_equal(tr.columns[name], col, err_msg=name)


def test_expand_layer_rejects_impossible_counts():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="<= tokens"):
        lt.expand_layer(np.array([3, 1]), 2, 2, rng)  # expert 0 chosen 3 times by 2 tokens


# ---------------------------------------------------------------- the shipped DeepSeek-V3 tables

@needs_tables
@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name.split(".")[0])
def test_shipped_table(path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = lt.read_load_table(path)
    bad = table.inconsistent_layers()
    assert table.model == "deepseek-v3" and table.top_k == 8 and table.moe_layers == tuple(range(3, 61))
    assert bool(bad) == ("out" in path.name and path.name.startswith("prefill"))  # README: prefill_in*out* files
    assert bool([w for w in caught if issubclass(w.category, lt.InconsistentTableWarning)]) == bool(bad)
    if not bad:  # at its own token count the apportioned table is the table itself
        np.testing.assert_array_equal(lt.scaled_counts(table, table.num_tokens), table.moe_counts)
    for seed in (0, 1):
        tr = lt.expand(table, 512, seed=seed)
        np.testing.assert_array_equal(tr.expert_load(), lt.scaled_counts(table, 512))
        _tokens_of(tr.dense()[0])
    rows = lt.table_stats(table)
    assert len(rows) == 58 and all(r["max_over_mean"] > 1 for r in rows)


@needs_tables
def test_shipped_table_via_trace_spec():
    tr = load_trace("deepseek-v3-expert-loads/decode_in1800out100:tokens=256,seed=2")
    again = load_trace(f"{TABLES[0].parent / 'decode_in1800out100.json.gz'}:seed=2,tokens=256")
    assert tr.meta.model == "deepseek-v3" and tr.num_tokens == 256 and tr.meta.num_layers == 58
    np.testing.assert_array_equal(tr.columns["expert"], again.columns["expert"])
    assert tr.meta.extra["model_layer_index_0based"][0] == 3


# ---------------------------------------------------------------- warnings and errors

def test_inconsistent_table_warns_naming_layers(tmp_path):
    counts = [[0, 0, 0], [2, 1, 1], [2, 2, 0], [1, 1, 0], [2, 1, 1]]  # rows 1, 4 record 4 selections, row 3 only 2
    path = _write(tmp_path, {"logical_count": counts})
    with pytest.warns(lt.InconsistentTableWarning, match=r"MoE layers 3 \(table rows\)"):
        table = lt.read_load_table(path, top_k=2)
    tr = lt.expand(table, seed=0)
    np.testing.assert_array_equal(tr.expert_load(), [[2, 1, 1], [2, 2, 0], [2, 2, 0], [2, 1, 1]])


@pytest.mark.parametrize("doc, match", [
    ({"logical_count": [[1, 2], [1]]}, "ragged"),
    ({"logical_count": [[1, -2], [1, 1]]}, "negative"),
    ({"logical_count": [[1, 2.5], [1, 1]]}, "not an integer"),
    ({"logical_count": [[1, "2"], [1, 1]]}, "not a number"),
    ({"logical_count": [[1, True], [1, 1]]}, "not a number"),
    ({"logical_count": [[1, 1e300], [1, 1]]}, "not exact"),
    ({"logical_count": []}, "non-empty list"),
    ({"counts": [[1]]}, "expected a JSON object with key 'logical_count'"),
    ({"logical_count": [[0, 0], [0, 0]]}, "every layer's counts are zero"),
    ({"logical_count": [[3, 1]]}, "more than the layer's"),
])
def test_bad_tables(tmp_path, doc, match):
    path = _write(tmp_path, doc, gz=True)
    with pytest.raises(ValueError, match=match) as exc:
        lt.read_load_table(path, top_k=2)
    assert str(path) in str(exc.value)


def test_top_k_needed_without_a_catalog_match(tmp_path):
    with pytest.raises(ValueError, match="give top_k"):
        lt.read_load_table(_write(tmp_path, {"logical_count": HAND}))


def test_huge_files_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:  # sparse: no disk used
        fh.truncate(lt.MAX_TABLE_BYTES + 1)
    with pytest.raises(ValueError, match="over the load-table limit"):
        lt.read_load_table(big, top_k=2)
    # a small gzip file whose text is over the limit (a gzip bomb) is refused too
    monkeypatch.setattr(lt, "MAX_TABLE_BYTES", 1000)
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b'{"logical_count": [[' + b"1, " * 2000 + b"1]]}"))
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError, match="decompressed text is over"):
        lt.read_text_bounded(bomb, 1000)


def test_expansion_size_limit(tmp_path):
    table = lt.load_table_from_counts(np.array(HAND), top_k=2)
    with pytest.raises(ValueError, match="over the limit.*tokens"):
        lt.expand(table, lt.MAX_EXPANDED_ROWS)


@pytest.mark.parametrize("spec, match", [("x.json:tokens=0", "must be >= 1"), ("x.json:tokens=a", "integer"),
                                         ("x.json:frames=3", "unknown option")])
def test_bad_spec_options(spec, match):
    with pytest.raises(ValueError, match=match):
        lt.split_spec(spec)


def test_options_on_a_non_table_trace_are_an_error():
    with pytest.raises(ValueError, match="expert-load tables only"):
        load_trace("default:tokens=4")


def test_trace_stats_cli_reports_the_table(tmp_path, capsys):
    from moesim.cli import main

    path = _write(tmp_path, {"logical_count": HAND}, gz=True)
    # no catalog model has 3 blocks x 4 experts: trace-stats names the missing top_k
    assert main(["trace-stats", str(path)]) == 2
    assert "give top_k" in capsys.readouterr().err
    doc = {"logical_count": [[0] * 256] * 3 + [[8] * 32 + [0] * 224] * 58}  # DeepSeek-V3 shape: 32 tokens, top-8
    path = _write(tmp_path, doc, name="dsv3.json", gz=True)
    assert main(["trace-stats", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 58 and rows[0]["model_layer"] == 3
    assert rows[0]["max_over_mean"] == pytest.approx(8.0) and rows[0]["experts_unused"] == 224
    assert rows[0]["tokens"] == 32


def test_study_traffic_from_a_table(tmp_path):
    from moesim.study.traffic import drill_tokens, make_traffic
    from workloads.catalog import get_model

    doc = {"logical_count": [[0] * 256] * 3 + [[8] * 32 + [0] * 224] * 58}  # DeepSeek-V3 shape: 32 tokens, top-8
    path = _write(tmp_path, doc, name="dsv3.json", gz=True)
    tr = make_traffic(f"table:{path}", get_model("deepseek-v3"), 64, 2, 0)
    assert tr.num_steps == 2 and tr.meta.num_layers == 58
    np.testing.assert_array_equal(tr.expert_load(), np.tile([32] * 32 + [0] * 224, (58, 1)))  # 2 steps x 16 each
    with pytest.raises(ValueError, match="model 'flame-moe-290m' 64 experts"), \
            pytest.warns(lt.InconsistentTableWarning, match="top-6"):  # 256 selections are not tokens x 6
        make_traffic(f"table:{path}", get_model("flame-moe-290m"), 64, 1, 0)
    with pytest.raises(ValueError, match="not an expert-load table"):
        make_traffic("table:default", get_model("deepseek-v3"), 64, 1, 0)
    # drill-down of table traffic is summed per node (the per-GPU counts could be the table itself)
    dev = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(drill_tokens(f"table:{path}", dev, 3), [[3, 12], [21, 30]])
    np.testing.assert_array_equal(drill_tokens("flame", dev, 3), dev)
