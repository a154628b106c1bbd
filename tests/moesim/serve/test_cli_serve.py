"""``moesim serve`` end to end: files and stable JSON names, disaggregation, one-line errors."""

import json

import pytest

from moesim.cli import main

MODEL = ["--model", "olmoe-1b-7b", "--system", "dgx-h100", "--ep", "8"]


def test_serve_writes_metrics_with_stable_names(tmp_path, capsys):
    out, js = tmp_path / "run", tmp_path / "m.json"
    assert main(["serve", *MODEL, "--rate", "5", "--duration-s", "4", "--out", str(out), "--json", str(js)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert json.loads(js.read_text()) == m
    assert m["schema"] == "moesim.serve.metrics/1"
    for k in ("ttft", "tpot", "e2e", "queue"):
        assert set(m["latency_s"][k]) == {"mean", "p50", "p90", "p99", "count"}
    assert m["requests"]["finished"] == m["requests"]["total"] > 0
    th = m["throughput"]
    assert th["output_tokens_per_s_per_device"] == pytest.approx(th["output_tokens_per_s"] / 8)
    assert m["config"]["pools"]["colocated"]["ep"] == 8
    rows = (out / "requests.csv").read_text().splitlines()
    assert len(rows) == m["requests"]["total"] + 1
    assert rows[0].startswith("arrival_s,prompt_tokens,output_tokens,ttft_s")
    assert "TTFT" in capsys.readouterr().out


def test_serve_from_arrivals_file_disaggregated(tmp_path):
    arr = tmp_path / "a.csv"
    arr.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10\n0.01,2000,1\n0.02,50,40\n")
    out = tmp_path / "run"
    assert main(["serve", *MODEL[:4], "--ep", "4", "--arrivals", str(arr), "--disaggregate", "4:4",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["requests"]["finished"] == 3
    assert main(["serve", *MODEL, "--arrivals", str(arr), "--duration-s", "0.015", "--out", str(tmp_path / "r2")]) == 0
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["requests"]["total"] == 2
    assert set(m["kv"]) == {"prefill", "decode"}
    assert m["config"]["pools"]["prefill"]["dp"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--disaggregate", "3:4"], "P \\+ D = 7 must equal the system's 8 devices"),
    (["--disaggregate", "x"], "must be P:D"),
    (["--tp", "3"], "--tp 3 must divide the 8 devices"),
    (["--arrival-process", "weibull"], "--arrival-process must be one of poisson, gamma"),
    (["--cv", "2"], "--cv applies to --arrival-process gamma"),
    (["--disaggregate", "4:4", "--dp", "4"], "--dp applies to a colocated run"),
    (["--ep", "2", "--dp", "4"], "tp x dp = 1 x 4 = 4 devices, but system 'dgx-h100' has 8"),
])
def test_serve_bad_options_are_one_line(tmp_path, capsys, extra, message):
    assert main(["serve", *MODEL, "--rate", "1", "--duration-s", "1", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re
    assert re.search(message, err), err


def test_serve_rate_needs_a_duration(tmp_path, capsys):
    assert main(["serve", *MODEL, "--rate", "1", "--out", str(tmp_path / "o")]) == 2
    assert "--rate needs --duration-s" in capsys.readouterr().err


def test_serve_bad_arrivals_file_is_one_line(tmp_path, capsys):
    arr = tmp_path / "a.csv"
    arr.write_text("arrival_s,prompt_tokens,output_tokens\n0,100,10\n0.5,abc,3\n")
    assert main(["serve", *MODEL, "--arrivals", str(arr), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"arrivals file {arr}, row 3: prompt_tokens must be an integer" in err and len(err.splitlines()) == 1


def test_serve_refuses_an_existing_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["serve", *MODEL, "--rate", "1", "--duration-s", "1", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_serve_replays_a_routing_trace(tmp_path):
    """OLMoE has 64 experts per layer like the embedded FLAME-MoE trace: its MoE layers replay that routing."""
    out = tmp_path / "run"
    assert main(["serve", *MODEL, "--rate", "4", "--duration-s", "2", "--trace", "default", "--two-batch-overlap",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["routing"] == "trace" and m["requests"]["finished"] == m["requests"]["total"]
    assert m["config"]["pools"]["colocated"]["two_batch_overlap"] is True


def test_serve_with_swap_preemption_under_memory_pressure(tmp_path):
    """A KV cache squeezed to about 3,000 tokens per device (memory fraction 0.037: 2.56 GB of OLMoE weights
    per device plus 3,000 x 128 KiB, of 80 GB) forces preemptions; with --preemption swap they go to host."""
    out = tmp_path / "run"
    assert main(["serve", *MODEL, "--rate", "40", "--duration-s", "3", "--memory-fraction", "0.037",
                 "--preemption", "swap", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["scheduler"]["preemption"] == "swap"
    assert m["requests"]["finished"] + m["requests"]["rejected"] == m["requests"]["total"]
    assert m["kv"]["colocated"]["host_capacity_blocks_per_rank"] > 0 and m["kv"]["colocated"]["ranks"] == 8
    assert m["preemption"]["count"] > 0 and m["preemption"]["swapped_tokens"] > 0
