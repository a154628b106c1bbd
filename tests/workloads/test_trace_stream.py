"""Streamed traces: one step per row group, read back step by step, verified, clear errors."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads import trace_stream
from workloads.importers import load_trace
from workloads.trace import META_KEY, Trace, TraceError, columns_checksum, from_dense, read_parquet, write_parquet
from workloads.trace_stream import ROW_GROUPS_KEY, TraceStream, split_steps, write_steps, write_stream

STEPS = 4


@pytest.fixture(scope="module")
def trace():
    """The embedded FLAME trace (2,048 tokens x 8 layers x top-6) as 4 steps of 512 tokens, with a
    string column carried along."""
    base = load_trace("default")
    e, w = base.dense()
    n = e.shape[0]
    t = from_dense(e, w, base.meta, step=(np.arange(n) // (n // STEPS)).astype(np.int32), token=np.arange(n) % (n // STEPS),
                   extra={"text": np.array([f"tok{i}" for i in range(n)], dtype=object)})
    return t


def same_columns(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_row_groups_are_steps_and_read_parquet_accepts_it(trace, tmp_path):
    path = write_stream(trace, tmp_path / "t.parquet")
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == STEPS
    for i in range(STEPS):
        stats = meta.row_group(i).column(pq.ParquetFile(path).schema_arrow.names.index("step")).statistics
        assert stats.min == stats.max == i
    index = json.loads(meta.metadata[ROW_GROUPS_KEY])
    assert index["steps"] == list(range(STEPS)) and sum(index["rows"]) == len(trace)
    whole = read_parquet(path)  # the in-memory reader verifies the whole-file checksum
    assert whole.notes == ()
    same_columns(whole.columns, trace.columns)


@pytest.mark.parametrize("writer", ["stream", "write_parquet"])
def test_steps_read_back_equal_the_trace(trace, tmp_path, monkeypatch, writer):
    monkeypatch.setattr(trace_stream, "BATCH_ROWS", 5000)  # batches cut steps in the middle
    path = tmp_path / "t.parquet"
    (write_stream if writer == "stream" else write_parquet)(trace, path)
    stream = TraceStream(path)
    got = list(stream.steps())
    want = list(split_steps(trace))
    assert len(got) == STEPS
    for g, w in zip(got, want):
        same_columns(g.columns, w.columns)
    assert stream.num_steps == STEPS and stream.num_tokens == trace.num_tokens
    assert stream.expected_steps == (STEPS if writer == "stream" else None)
    assert stream.tokens_per_step() == trace.tokens_per_step()
    np.testing.assert_array_equal(stream.expert_load(), trace.expert_load())
    assert stream.notes == ()


def test_whole_figures_need_a_full_read(trace, tmp_path):
    stream = TraceStream(write_stream(trace, tmp_path / "t.parquet"))
    with pytest.raises(TraceError, match="once steps\\(\\) has been read to the end"):
        stream.expert_load()


def rewrite_row_groups(src, dst, change_group: int):
    """Copy a streamed file row group by row group, keeping its metadata and index, with one expert id
    of row group ``change_group`` swapped with its neighbour (a still valid trace)."""
    pf = pq.ParquetFile(src)
    with pq.ParquetWriter(dst, pf.schema_arrow) as w:
        for i in range(pf.metadata.num_row_groups):
            t = pf.read_row_group(i)
            if i == change_group:
                e = t.column("expert").to_numpy().copy()
                e[:2] = e[1::-1]
                t = t.set_column(t.column_names.index("expert"), "expert", [e])
            w.write_table(t)
        w.add_key_value_metadata({ROW_GROUPS_KEY: pf.metadata.metadata[ROW_GROUPS_KEY]})


def test_damaged_row_group_is_refused_naming_it(trace, tmp_path):
    src = write_stream(trace, tmp_path / "t.parquet")
    rewrite_row_groups(src, tmp_path / "same.parquet", change_group=-1)
    assert len(list(TraceStream(tmp_path / "same.parquet").steps())) == STEPS  # the copy itself is fine
    rewrite_row_groups(src, tmp_path / "bad.parquet", change_group=2)
    steps = TraceStream(tmp_path / "bad.parquet").steps()
    next(steps), next(steps)  # steps before the damage are read
    with pytest.raises(TraceError, match=r"bad.parquet: row group 2 \(step 2\) does not match its checksum"):
        next(steps)


def test_damaged_body_of_plain_file_is_refused_before_any_step(trace, tmp_path):
    path = write_parquet(trace, tmp_path / "t.parquet")
    table = pq.read_table(path)
    e = table.column("expert").to_numpy().copy()
    e[-2:] = e[-1:-3:-1]
    pq.write_table(table.set_column(table.column_names.index("expert"), "expert", [e])
                   .replace_schema_metadata(table.schema.metadata), path)
    with pytest.raises(TraceError, match="do not match the checksum"):
        next(TraceStream(path).steps())


def test_truncated_and_foreign_files_are_clear_errors(trace, tmp_path):
    path = write_stream(trace, tmp_path / "t.parquet")
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match="cut.parquet: not a readable Parquet file"):
        TraceStream(tmp_path / "cut.parquet")
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "foreign.parquet")
    with pytest.raises(TraceError, match="foreign.parquet: Parquet file has no moesim trace metadata"):
        TraceStream(tmp_path / "foreign.parquet")
    with pytest.raises(TraceError, match="missing.parquet: no such trace file"):
        TraceStream(tmp_path / "missing.parquet")


def test_damaged_index_is_refused(trace, tmp_path):
    path = write_stream(trace, tmp_path / "t.parquet")
    pf = pq.ParquetFile(path)
    index = json.loads(pf.metadata.metadata[ROW_GROUPS_KEY])
    index["sha256"] = index["sha256"][:-1]
    with pq.ParquetWriter(tmp_path / "bad.parquet", pf.schema_arrow) as w:
        for i in range(pf.metadata.num_row_groups):
            w.write_table(pf.read_row_group(i))
        w.add_key_value_metadata({ROW_GROUPS_KEY: json.dumps(index)})
    with pytest.raises(TraceError, match="row-group index .* does not list the file's 4 row groups"):
        TraceStream(tmp_path / "bad.parquet")


def test_steps_out_of_order_are_refused(trace, tmp_path, monkeypatch):
    steps = list(split_steps(trace))
    with pytest.raises(TraceError, match="steps must ascend: step 0 comes after step 1"):
        write_steps(tmp_path / "w.parquet", trace.meta, [steps[1], steps[0]])
    assert not (tmp_path / "w.parquet").exists() and not (tmp_path / "w.parquet.tmp").exists()
    with pytest.raises(TraceError, match="holds several steps"):
        write_steps(tmp_path / "w.parquet", trace.meta, [trace])
    # a plain file whose rows go back to an earlier step (step 0 split in two)
    order = np.concatenate([np.flatnonzero(trace.step == 0)[:100], np.flatnonzero(trace.step == 1),
                            np.flatnonzero(trace.step == 0)[100:]])
    path = write_parquet(trace.select(order), tmp_path / "split.parquet")
    for batch_rows in (5000, 24676):  # the step going back inside a batch, and at a batch's first row
        monkeypatch.setattr(trace_stream, "BATCH_ROWS", batch_rows)
        with pytest.raises(TraceError, match="split.parquet: rows are not sorted by step: row 24676 has step 0 "
                                             "after step 1"):
            next(TraceStream(path).steps())


def test_bad_values_in_a_step_name_file_and_row_group(trace, tmp_path):
    steps = [dict(s.columns) for s in split_steps(trace)]
    steps[1]["expert"] = steps[1]["expert"].astype(np.float64)
    steps[1]["expert"][3] = 5.5
    with pytest.raises(TraceError, match="column 'expert' row 3: 5.5 is not an integer"):
        write_steps(tmp_path / "w.parquet", trace.meta, steps)


def test_partial_steps_are_refused_or_noted(trace, tmp_path):
    cut = trace.select(~((trace.step == 2) & (trace.layer == 5)))
    path = write_stream(cut, tmp_path / "p.parquet")
    with pytest.raises(TraceError, match="step 2 has no rows for layer"):
        list(TraceStream(path).steps())
    stream = TraceStream(path, allow_partial=True)
    assert len(list(stream.steps())) == STEPS
    assert stream.notes[0].startswith("PARTIAL TRACE (p.parquet): 1 of 4 step(s) lack layers (first: step 2)")


def test_generator_written_file_has_no_whole_checksum_but_is_verified_per_step(trace, tmp_path):
    path = write_steps(tmp_path / "g.parquet", trace.meta, (s.columns for s in split_steps(trace)))
    assert len(list(TraceStream(path).steps())) == STEPS and TraceStream(path).notes == ()
    assert "no column checksum" in read_parquet(path).notes[0]  # the in-memory reader sees no whole checksum


def test_whole_file_checksum_streamed_matches_columns_checksum(trace, tmp_path, monkeypatch):
    """The one-column-at-a-time checksum equals columns_checksum (also over a string column in batches)."""
    monkeypatch.setattr(trace_stream, "BATCH_ROWS", 777)
    path = write_parquet(trace, tmp_path / "t.parquet")
    stream = TraceStream(path)
    assert stream.columns_sha256 == columns_checksum(trace.columns)
    stream._verify_whole_file()  # raises when they differ
    assert isinstance(next(stream.steps()), Trace)


def test_a_row_group_over_the_array_budget_is_refused_before_reading(trace, tmp_path, monkeypatch):
    path = write_stream(trace, tmp_path / "t.parquet")
    monkeypatch.setenv("MOESIM_MAX_ARRAY_BYTES", str(len(trace) // STEPS * 7 * 8 - 1))  # one step needs this + 1
    with pytest.raises(ValueError, match=r"t.parquet: row group 0 \(step 0\)"):
        next(TraceStream(path).steps())
    monkeypatch.setenv("MOESIM_MAX_ARRAY_BYTES", str(len(trace) // STEPS * 7 * 8))
    assert len(list(TraceStream(path).steps())) == STEPS


def test_unsorted_trace_is_written_grouped_by_step_with_a_matching_checksum(trace, tmp_path):
    shuffled = trace.select(np.random.default_rng(0).permutation(len(trace)))
    path = write_stream(shuffled, tmp_path / "t.parquet")
    back = read_parquet(path)  # verifies the whole-file checksum
    assert back.notes == () and np.all(np.diff(back.step) >= 0)
    np.testing.assert_array_equal(back.expert_load(), trace.expert_load())
    assert len(list(TraceStream(path).steps())) == STEPS
