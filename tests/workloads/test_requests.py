"""Requests: arrival processes, the fitted length model and the CSV arrivals file (bad files -> clear errors)."""

import numpy as np
import pytest

from workloads import requests as rq


def test_shipped_length_model_is_the_fit_of_the_shipped_sample():
    fit = rq.fit_length_model(rq.load_length_sample())
    assert fit.prompt == rq.AZURE_CONV_2023.prompt and fit.output == rq.AZURE_CONV_2023.output
    sample = rq.load_length_sample()
    assert {w: len(v) for w, v in sample.items()} == {"a": 196, "b": 199, "c": 164, "d": 159}


def test_length_fit_errors_are_reported_for_both_sets():
    errs = rq.length_fit_errors(rq.AZURE_CONV_2023, rq.load_length_sample())
    assert set(errs) == {"fit", "held_out"}
    # a maximum-likelihood lognormal reproduces the fitting set's geometric mean exactly
    rows = np.concatenate([rq.load_length_sample()[w] for w in rq.FIT_WINDOWS])
    assert np.exp(np.log(rows[:, 1]).mean()) == pytest.approx(rq.AZURE_CONV_2023.output.quantile(0.5))


def test_lognormal_from_median_and_mean():
    d = rq.LogNormal.from_median_mean(100.0, 150.0)
    assert d.quantile(0.5) == pytest.approx(100.0) and d.mean == pytest.approx(150.0)
    with pytest.raises(ValueError, match="median < mean"):
        rq.LogNormal.from_median_mean(100.0, 90.0)


def test_poisson_count_and_gaps():
    rate, dur = 50.0, 400.0
    r = rq.generate("poisson", rate, dur, rq.AZURE_CONV_2023, np.random.default_rng(1))
    # count ~ Poisson(rate * dur): within 4 standard deviations
    assert abs(len(r) - rate * dur) < 4 * np.sqrt(rate * dur)
    assert r.arrival_s.max() < dur and np.all(np.diff(r.arrival_s) >= 0)
    gaps = np.diff(r.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_interarrival_cv(cv):
    r = rq.generate("gamma", 100.0, 2000.0, rq.AZURE_CONV_2023, np.random.default_rng(2), cv=cv)
    gaps = np.diff(r.arrival_s)
    assert gaps.mean() == pytest.approx(1 / 100.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_generation_is_seeded_and_lengths_positive():
    a = rq.generate("poisson", 5.0, 100.0, rq.AZURE_CONV_2023, np.random.default_rng(3))
    b = rq.generate("poisson", 5.0, 100.0, rq.AZURE_CONV_2023, np.random.default_rng(3))
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert a.prompt_tokens.min() >= 1 and a.output_tokens.min() >= 1
    assert len(rq.generate("poisson", 5.0, 100.0, rq.AZURE_CONV_2023, np.random.default_rng(3), max_requests=7)) == 7


def _write(tmp_path, text, name="arr.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_arrivals_reads_a_good_file(tmp_path):
    p = _write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n0,10,5\n0.5,20,1\n\n0.5,3,3\n")
    r = rq.load_arrivals(p)
    assert r.arrival_s.tolist() == [0, 0.5, 0.5] and r.prompt_tokens.tolist() == [10, 20, 3]
    assert r.output_tokens.tolist() == [5, 1, 3] and r.source == str(p)


@pytest.mark.parametrize("text, message", [
    ("", "header must be"),
    ("t,p,o\n0,1,1\n", "header must be"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no requests"),
    ("arrival_s,prompt_tokens,output_tokens\nzero,1,1\n", "row 2: arrival_s 'zero' is not a number"),
    ("arrival_s,prompt_tokens,output_tokens\n-1,1,1\n", "row 2: arrival_s must be finite and >= 0"),
    ("arrival_s,prompt_tokens,output_tokens\nnan,1,1\n", "row 2: arrival_s must be finite"),
    ("arrival_s,prompt_tokens,output_tokens\n1,1,1\n0.5,1,1\n", "row 3: arrival_s 0.5 is earlier"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1.5,1\n", "row 2: prompt_tokens must be an integer"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1,0\n", "row 2: output_tokens must be an integer in \\[1"),
    ("arrival_s,prompt_tokens,output_tokens\n0,99999999999,1\n", "row 2: prompt_tokens must be an integer"),
    ("arrival_s,prompt_tokens,output_tokens\n0,1\n", "row 2: expected 3 values"),
])
def test_load_arrivals_bad_files_name_the_row(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        rq.load_arrivals(_write(tmp_path, text))


def test_load_arrivals_refuses_missing_binary_and_oversized_files(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found"):
        rq.load_arrivals(tmp_path / "none.csv")
    bad = tmp_path / "bin.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8|header must be"):
        rq.load_arrivals(bad)
    p = _write(tmp_path, "arrival_s,prompt_tokens,output_tokens\n0,1,1\n")
    monkeypatch.setattr(rq, "MAX_ARRIVALS_FILE_BYTES", 10)
    with pytest.raises(ValueError, match="bytes; files over 10 bytes are refused"):
        rq.load_arrivals(p)


def test_requests_validate_their_arrays():
    with pytest.raises(ValueError, match="non-decreasing"):
        rq.Requests(np.array([1.0, 0.0]), np.array([1, 1]), np.array([1, 1]))
    with pytest.raises(ValueError, match=">= 1"):
        rq.Requests(np.array([0.0]), np.array([0]), np.array([1]))
