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


def test_train_study_passes_every_step_option_through(tmp_path):
    """Each training option a study can set reaches the step: the study row equals `simulate_step` with the
    same TrainSpec built by hand (cp, etp, overlap, FP8 recipe, host overhead)."""
    from hwmodels.specs import load_system
    from moesim.train.ops import default_cost
    from moesim.train.spec import Parallel, TrainSpec
    from moesim.train.step import simulate_step
    from workloads.hf_config import load_config

    (tmp_path / "study.toml").write_text(
        '[study]\nengine = "train"\n[base]\nsystem = "dgx-h100"\nnodes = 2\nmodel = "mixtral-8x7b"\nlayers = 2\n'
        'tp = 2\ncp = 2\npp = 2\nep = 4\netp = 2\nschedule = "1f1b"\nrecompute = "none"\ndtype = "fp8"\n'
        'seq_len = 1024\nglobal_batch_size = 32\noverlap_grad_reduce = true\ntp_comm_overlap = true\n'
        'fp8_recipe = "tensorwise"\nhost_overhead = "cuda-graphs"\n[grid]\nzero = [1]\n')
    study = load_study(tmp_path)
    row = evaluate(study.configs[0], study.engine, study.seed)
    system = load_system("dgx-h100").with_nodes(2)
    par = Parallel(tp=2, pp=2, dp=2, ep=4, zero=1, cp=2, etp=2)
    spec = TrainSpec(parallel=par, seq_len=1024, micro_batch_size=1, global_batch_size=32, schedule="1f1b",
                     recompute="none", dtype="fp8", routing="balanced", overlap_grad_reduce=True,
                     tp_comm_overlap=True, fp8_recipe="tensorwise", host_overhead="cuda-graphs")
    ref = simulate_step(load_config("mixtral-8x7b").with_layers(2), system, spec, default_cost(system.device),
                        check_memory=False)
    assert row["dp"] == 2
    assert row["step_time_s"] == pytest.approx(ref.step_time_s, rel=1e-12)
    plain = dict(study.configs[0], fp8_recipe="none", host_overhead="none", tp_comm_overlap=False)
    assert evaluate(plain, study.engine, study.seed)["step_time_s"] != row["step_time_s"]
