"""Bad trace files get a clear error naming the column, row or key -- never a silent wrong result:
lossy casts, a newer format, a damaged body (checksum), a missing layer, sizes that would exhaust memory."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moebase.limits import TooLargeError
from workloads.trace import (META_KEY, PARTIAL_NOTE, TraceError, TraceMeta, from_dense, read_parquet,
                             write_parquet)


def _trace(num_experts=8, layers=2, tokens=6, k=2, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    meta = TraceMeta(model="toy", num_experts=num_experts, top_k=k, num_layers=layers, source="test")
    return from_dense(ids, None, meta)


def _rewrite(path, out, *, column=None, values=None, header=None):
    """Rewrite a trace file with one column replaced and/or its header edited (the header is kept as is
    otherwise: what a bit-flip in the body or a hand edit produces)."""
    table = pq.read_table(path)
    head = json.loads(table.schema.metadata[META_KEY])
    if column is not None:
        table = table.set_column(table.column_names.index(column), column, pa.array(values))
    if header is not None:
        head = header(head)
    pq.write_table(table.replace_schema_metadata({META_KEY: json.dumps(head).encode()}), out)
    return out


@pytest.fixture
def written(tmp_path):
    return write_parquet(_trace(), tmp_path / "t.parquet")


def _no_checksum(h):
    h.pop("columns_sha256")
    return h


def test_round_trip_is_verified_and_note_free(written):
    back = read_parquet(written)
    assert back.notes == ()
    assert "columns_sha256" in json.loads(pq.read_schema(written).metadata[META_KEY])


def test_float_expert_id_is_refused_with_column_and_row(written, tmp_path):
    e = pq.read_table(written).column("expert").to_numpy().astype(float)
    e[5] = 5.7
    bad = _rewrite(written, tmp_path / "f.parquet", column="expert", values=e, header=_no_checksum)
    with pytest.raises(TraceError, match=r"column 'expert' row 5: 5\.7 is not an integer"):
        read_parquet(bad)


def test_integral_floats_are_accepted(written, tmp_path):
    e = pq.read_table(written).column("expert").to_numpy()
    ok = _rewrite(written, tmp_path / "f.parquet", column="expert", values=e.astype(float), header=_no_checksum)
    np.testing.assert_array_equal(read_parquet(ok).columns["expert"], e)


def test_int64_expert_id_beyond_int32_is_refused_not_wrapped(written, tmp_path):
    e = pq.read_table(written).column("expert").to_numpy().astype(np.int64)
    e[3] = 2**32 + 1  # would wrap to expert 1, a valid id
    bad = _rewrite(written, tmp_path / "w.parquet", column="expert", values=e, header=_no_checksum)
    with pytest.raises(TraceError, match=r"column 'expert' row 3: 4294967297 does not fit int32"):
        read_parquet(bad)


def test_from_dense_refuses_float_ids():
    meta = TraceMeta(model="toy", num_experts=8, top_k=1, num_layers=1, source="test")
    with pytest.raises(TraceError, match=r"column 'expert' row 1: 2\.5 is not an integer"):
        from_dense(np.array([[[1.0]], [[2.5]]]), None, meta)


@pytest.mark.parametrize("key, value, message", [
    ("num_experts", 64.9, r"key 'num_experts' must be an integer, got 64\.9"),
    ("top_k", "2", r"key 'top_k' must be an integer, got '2'"),
    ("num_layers", True, r"key 'num_layers' must be an integer, got True"),
    ("format_version", 2, r"format_version 2 is newer than this moesim reads \(1\)"),
    ("format_version", "1", r"format_version must be a positive integer"),
])
def test_bad_metadata_values_are_refused(written, tmp_path, key, value, message):
    bad = _rewrite(written, tmp_path / "m.parquet", header=lambda h: {**h, key: value})
    with pytest.raises(TraceError, match=message):
        read_parquet(bad)


def test_changed_body_fails_the_checksum(written, tmp_path):
    e = pq.read_table(written).column("expert").to_numpy().copy()
    e[0], e[1] = e[1], e[0]  # still a valid trace: only the checksum can tell
    bad = _rewrite(written, tmp_path / "flip.parquet", column="expert", values=e)
    with pytest.raises(TraceError, match="do not match the checksum"):
        read_parquet(bad)


def test_trace_without_checksum_is_accepted_with_a_note(written, tmp_path):
    old = _rewrite(written, tmp_path / "old.parquet", header=_no_checksum)
    t = read_parquet(old)
    assert len(t) == len(read_parquet(written))
    assert any("no column checksum" in n for n in t.notes)


def test_missing_layer_is_an_error_unless_allowed(tmp_path):
    t = _trace(layers=3)
    partial = t.select(t.columns["layer"] != 1)
    path = write_parquet(partial, tmp_path / "p.parquet")  # writing keeps what it is given
    with pytest.raises(TraceError, match=r"1 of 1 step\(s\) lack layers: step 0 has no rows for layer\(s\) 1 of "
                                         r"num_layers=3.*allow partial"):
        read_parquet(path)
    loose = read_parquet(path, allow_partial=True)
    assert [n for n in loose.notes if n.startswith(PARTIAL_NOTE)]


def test_huge_num_experts_is_refused_before_allocating():
    t = _trace()
    from dataclasses import replace

    big = replace(t, meta=replace(t.meta, num_experts=10**9))
    with pytest.raises(TooLargeError, match=r"expert-load table .* would need .* GB"):
        big.expert_load()


@pytest.mark.parametrize("big", [10**12, 2**62])  # a packed key, and one that would overflow int64
def test_huge_token_id_does_not_overflow_the_duplicate_check(big):
    t = _trace(tokens=2)
    cols = dict(t.columns)
    cols["token"] = np.where(cols["token"] == 1, big, cols["token"])
    from workloads.trace import Trace, validate

    validate(Trace(columns=cols, meta=t.meta))  # distinct tokens: valid
    cols["rank"] = np.zeros_like(cols["rank"])
    with pytest.raises(TraceError, match="ranks repeat for one token"):
        validate(Trace(columns=cols, meta=t.meta))
