"""Studies run the device's default cost model (as ``moesim simulate``) and record which one ran."""

import pytest

from hwmodels.cost import cost_model, cost_names, describe_cost
from hwmodels.specs import load_system
from moesim.study.evaluate import evaluate
from moesim.study.spec import PARAMETERS, load_study

CONFIG = {**PARAMETERS, "tokens": 256}


def test_study_cost_names_are_the_cost_module_names():
    assert PARAMETERS["cost"] == "default"
    assert set(cost_names()) == {"default", "roofline", "gpu-fitted"}  # calibrated needs a profile


@pytest.mark.parametrize("name", ["default", "roofline", "gpu-fitted"])
def test_row_records_the_cost_model_that_ran(name):
    row = evaluate({**CONFIG, "cost": name}, "analytic", 0)
    system = load_system(CONFIG["system"])
    ran = cost_model(name, system.device)
    assert row["cost"] == name and row["cost_model"] == ran.name
    assert row["cost_description"] == describe_cost(ran, system.device, CONFIG["dtype"], system=system)


def test_default_is_the_fitted_model_on_a_gpu_with_a_fit_and_is_slower_than_the_roofline():
    assert load_system(CONFIG["system"]).device.gpu_fit  # the study default system has shipped fitted parameters
    default = evaluate({**CONFIG, "cost": "default"}, "analytic", 0)
    fitted = evaluate({**CONFIG, "cost": "gpu-fitted"}, "analytic", 0)
    roofline = evaluate({**CONFIG, "cost": "roofline"}, "analytic", 0)
    assert default["cost_model"] == "gpu-fitted" and roofline["cost_model"] == "roofline"
    assert default["throughput_tokens_per_s"] == fitted["throughput_tokens_per_s"]
    assert default["throughput_tokens_per_s"] < roofline["throughput_tokens_per_s"]  # measured GEMMs are slower
    assert default["config_id"] != fitted["config_id"]  # the parameter as written is part of the id


def test_default_is_the_roofline_on_a_device_without_a_fit(tmp_path):
    system = load_system("sn40l-node")
    assert not system.device.gpu_fit
    assert cost_model("default", system.device).name == "roofline"


def test_unknown_cost_is_refused_naming_file_and_key(tmp_path):
    (tmp_path / "study.toml").write_text("[base]\ncost = 'datasheet'\n[grid]\nnodes = [1]\n")
    with pytest.raises(ValueError, match=r"study.toml: \[base\]: key 'cost': unknown cost model 'datasheet'"):
        load_study(tmp_path)


def test_des_engine_runs_the_same_default_cost_as_analytic():
    analytic = evaluate({**CONFIG, "cost": "default"}, "analytic", 0)
    des = evaluate({**CONFIG, "cost": "default"}, "des", 0)
    assert des["cost_model"] == "gpu-fitted" and des["cost_description"] == analytic["cost_description"]
    assert des["total_time_s"] == pytest.approx(analytic["total_time_s"], rel=1e-9)  # one micro-batch: exact
