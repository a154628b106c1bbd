"""``moesim simulate --dispatch-dtype/--combine-dtype/--comm-kernel`` reach SimOptions, and bad values are one line."""

import json

import pytest

from moesim.cli import main


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_comm_flags_reach_the_simulation(tmp_path):
    base, fp8 = tmp_path / "base", tmp_path / "fp8"
    assert main(["simulate", "--system", "hgx-h800", "--out", str(base)]) == 0
    assert main(["simulate", "--system", "hgx-h800", "--dispatch-dtype", "fp8", "--combine-dtype", "fp32",
                 "--comm-kernel", "none", "--out", str(fp8)]) == 0
    s_base, s_fp8 = _summary(base), _summary(fp8)
    assert s_base["dispatch_dtype"] == s_base["combine_dtype"] == "bf16"   # unset: --dtype
    assert s_base["comm_kernel"] == "deepep-normal-v1"                      # unset: SimOptions' default
    assert (s_fp8["dispatch_dtype"], s_fp8["combine_dtype"], s_fp8["comm_kernel"]) == ("fp8", "fp32", "none")
    # fp8 dispatch sends fewer bytes per token than bf16, an fp32 combine more
    assert s_fp8["activation_bytes_per_token"] < s_base["activation_bytes_per_token"]
    assert s_fp8["combine_bytes_per_token"] == 2 * s_base["combine_bytes_per_token"]


@pytest.mark.parametrize("flag, value", [("--dispatch-dtype", "fp4"), ("--combine-dtype", "int8"),
                                         ("--comm-kernel", "nccl-magic")])
def test_bad_comm_flag_is_a_one_line_error_naming_the_flag(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        main(["simulate", flag, value, "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and flag in err[0] and repr(value) in err[0] and "choose from" in err[0]
    assert not (tmp_path / "run").exists()


def test_help_lists_the_valid_values(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    text = "".join(capsys.readouterr().out.split())  # help wraps lines (and hyphenated names) at any width
    assert "oneof:bf16,fp16,fp32,fp8" in text and "oneof:none,deepep-normal-v1,deepseek-v3-all-to-all" in text
