"""Golden-file regression of the demo run: ``make demo``'s simulate command against tests/golden/demo.json."""

from __future__ import annotations

import json

from tests.golden.regen import GOLDEN_PATH, REGEN_COMMAND, demo_argv, demo_record, differences


def test_demo_run_matches_the_golden_record(tmp_path):
    golden = json.loads(GOLDEN_PATH.read_text())
    got = demo_record(tmp_path)
    diffs = differences(golden, got)
    hint = (f"If the change is intended, regenerate with `{REGEN_COMMAND}` and commit tests/golden/demo.json "
            "with the reason.")
    if golden.get("cost_model") != got.get("cost_model"):
        hint = (f"The demo's cost model changed from {golden.get('cost_model')!r} to {got.get('cost_model')!r}. "
                + hint)
    assert not diffs, f"the demo run differs from {GOLDEN_PATH.name} ({len(diffs)}): " + "; ".join(diffs[:10]) + ". " + hint


def test_golden_comparison_is_not_vacuous():
    golden = json.loads(GOLDEN_PATH.read_text())
    assert golden["command"] == "moesim " + " ".join(demo_argv())
    assert golden["total_time_s"] > 0 and set(golden["ops"]) >= {"router", "dispatch", "expert_ffn", "combine"}
    nudged = json.loads(json.dumps(golden))
    nudged["total_time_s"] *= 1 + 1e-8
    nudged["ops"]["expert_ffn"]["rows"] += 1
    nudged["cost_model"] = "calibrated"
    assert sorted(d.split(":")[0] for d in differences(golden, nudged)) == [
        "cost_model", "ops.expert_ffn.rows", "total_time_s"]
    assert differences(golden, json.loads(json.dumps(golden))) == []
