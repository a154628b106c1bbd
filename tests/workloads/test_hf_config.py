"""Hugging Face configs: the shipped ones parse to the published shapes; bad input fails with one clear line."""

from __future__ import annotations

import json

import pytest

from workloads.catalog import load_catalog
from workloads.hf_config import (CONFIG_DIR, MAX_CONFIG_BYTES, ConfigError, ConfigWarning, available_configs,
                                 load_config, parse_config)


def test_every_shipped_config_loads_without_warning_and_names_its_source():
    names = available_configs()
    assert {"deepseek-v3", "deepseek-v2", "mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b", "olmoe-1b-7b",
            "llama-3.1-70b"} <= set(names)
    for name in names:
        with _no_warning():
            cfg = load_config(name)
        assert cfg.source.startswith("https://huggingface.co/") and cfg.source.endswith("/blob/main/config.json")


class _no_warning:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", ConfigWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def test_deepseek_v3_layout_mla_shared_and_group_routing():
    cfg = load_config("deepseek-v3")
    assert cfg.moe_layers == tuple(range(3, 61))
    assert cfg.attention_kind == "mla" and cfg.q_lora_rank == 1536 and cfg.kv_lora_rank == 512
    assert cfg.num_shared_experts == 1 and cfg.shared_expert_intermediate_size == 2048
    assert (cfg.n_group, cfg.topk_group) == (8, 4)
    assert cfg.intermediate_size == 18432 and cfg.moe_intermediate_size == 2048


def test_deepseek_v2_fuses_two_shared_experts():
    cfg = load_config("deepseek-v2")
    assert cfg.num_shared_experts == 2 and cfg.shared_expert_intermediate_size == 2 * 1536
    assert cfg.moe_layers[0] == 1 and len(cfg.moe_layers) == 59


def test_mixtral_expert_width_is_intermediate_size_and_qwen2_has_one_shared_expert():
    mix = load_config("mixtral-8x7b")
    assert mix.moe_intermediate_size == 14336 and mix.moe_layers == tuple(range(32)) and mix.attention_kind == "gqa"
    qwen = load_config("qwen2-57b-a14b")
    assert qwen.num_shared_experts == 1 and qwen.shared_expert_intermediate_size == 20480


def test_dense_llama_has_no_moe_layers():
    cfg = load_config("llama-3.1-70b")
    assert not cfg.is_moe and cfg.moe_layers == () and cfg.num_key_value_heads == 8
    with pytest.raises(ConfigError, match="dense"):
        cfg.to_moe_model()


@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_configs_agree_with_the_moe_layer_catalog(name):
    m = load_config(name).to_moe_model()
    c = load_catalog()[name]
    for key in ("hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_shared_experts",
                "shared_expert_intermediate_size", "num_layers", "moe_layers"):
        assert getattr(m, key) == getattr(c, key), key


BASE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "vocab_size": 100, "intermediate_size": 128}


def test_qwen_sparse_step_and_mlp_only_layers():
    cfg = parse_config({**BASE, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                        "decoder_sparse_step": 2, "mlp_only_layers": [3]}, name="t", where="t.json")
    assert cfg.moe_layers == (1,)


def test_unknown_field_is_named_in_a_warning(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "rope_theta": 1e4, "mamba_d_state": 16}))
    with pytest.warns(ConfigWarning, match="mamba_d_state") as rec:
        load_config(path)
    assert "rope_theta" not in str(rec[0].message)


@pytest.mark.parametrize("raw, match", [
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "missing field 'hidden_size'"),
    ({**BASE, "num_hidden_layers": "4"}, "'num_hidden_layers' must be an integer"),
    ({**BASE, "num_key_value_heads": 3}, "not a multiple"),
    ({**BASE, "num_experts": 4, "num_experts_per_tok": 5}, "exceeds"),
])
def test_bad_fields_fail_naming_the_field(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw, name="t", where="t.json")


def test_oversized_and_non_json_files_are_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(" " * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="over the .* byte limit for a model config.json"):
        load_config(big)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no model config"):
        load_config("no-such-model")
    assert CONFIG_DIR.is_dir()
