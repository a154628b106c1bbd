"""``moesim simulate`` without ``--cost`` runs the fitted GPU model where the spec ships one, and says so."""

import json

from moesim.cli import main


def test_default_cost_is_fitted_for_gpus_with_data_and_roofline_stays(tmp_path, capsys):
    fitted, roof = tmp_path / "fitted", tmp_path / "roof"
    assert main(["simulate", "--system", "hgx-h800", "--out", str(fitted)]) == 0
    printed = capsys.readouterr().out
    assert "cost model: gpu-fitted (h100-vidur)" in printed and "leave-one-model-out MAPE" in printed
    assert main(["simulate", "--system", "hgx-h800", "--cost", "roofline", "--out", str(roof)]) == 0
    s_fit = json.loads((fitted / "summary.json").read_text())
    s_roof = json.loads((roof / "summary.json").read_text())
    assert s_fit["cost_model"] == "gpu-fitted" and "vidur" in s_fit["cost_model_provenance"]
    assert s_roof["cost_model"] == "roofline" and "not fitted" in s_roof["cost_model_provenance"]
    assert s_fit["total_time_s"] > s_roof["total_time_s"]  # measured GEMMs are slower than the datasheet
    assert main(["report", str(fitted)]) == 0
    assert "h100-vidur" in (fitted / "report.html").read_text()
