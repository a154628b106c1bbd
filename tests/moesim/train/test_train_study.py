"""The ``train`` study engine: a study.toml of training layouts runs through the study machinery."""

from __future__ import annotations

import pytest

from moesim.study.evaluate import evaluate
from moesim.study.spec import load_study


def test_a_train_study_evaluates_each_layout(tmp_path):
    (tmp_path / "study.toml").write_text(
        '[study]\nengine = "train"\n[base]\nsystem = "dgx-h100"\nnodes = 2\nmodel = "mixtral-8x7b"\nlayers = 2\n'
        'pp = 2\nschedule = "1f1b"\nrecompute = "none"\ndtype = "bf16"\nseq_len = 1024\nglobal_batch_size = 32\n'
        '[grid]\nep = [2, 8]\nexpert_mode = ["ep", "fssdp"]\n')
    study = load_study(tmp_path)
    assert study.engine == "train" and len(study.configs) == 4
    rows = [evaluate(c, study.engine, study.seed) for c in study.configs]
    for row in rows:
        assert row["dp"] == 8 and row["step_time_s"] > 0
        assert row["throughput_tokens_per_s"] == pytest.approx(32 * 1024 / row["step_time_s"])
        assert (row["fssdp_bytes_per_step"] > 0) == (row["expert_mode"] == "fssdp")


def test_a_bad_train_parameter_is_named(tmp_path):
    (tmp_path / "study.toml").write_text('[study]\nengine = "train"\n[grid]\npp = [0]\n')
    with pytest.raises(ValueError, match="'pp' must be a positive integer"):
        load_study(tmp_path)
