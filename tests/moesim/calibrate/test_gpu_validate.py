"""``moesim validate --gpu-data DIR``: the fitted GPU models' held-out tables and plots from the shared data."""

from pathlib import Path

import pandas as pd
import pytest

from moesim.cli import main

SHARED_GPU_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "gpu-timings"


@pytest.mark.skipif(not SHARED_GPU_DATA.is_dir(), reason=f"shared GPU timing data not found at {SHARED_GPU_DATA}")
def test_validate_gpu_data_writes_tables_and_plots(tmp_path):
    assert main(["validate", "--gpu-data", str(SHARED_GPU_DATA), "--out", str(tmp_path)]) == 0
    lomo = pd.read_csv(tmp_path / "gpu_lomo.csv")
    assert set(lomo["gpu"]) == {"h100", "a100"} and len(lomo) == 6
    html = (tmp_path / "gpu_fidelity.html").read_text()
    assert "Predicted vs measured GEMM time" in html and "DeepGEMM" in html


def test_validate_gpu_data_missing_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["validate", "--gpu-data", str(tmp_path / "nope"), "--out", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--gpu-data" in err and "not a directory" in err
