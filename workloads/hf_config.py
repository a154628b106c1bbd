"""Transformer models from their Hugging Face ``config.json``: the shapes a training step needs.

``load_config(spec)`` takes a shipped name (``workloads/configs/<name>.json``, each with the URL of
the ``config.json`` it copies under ``_source``) or a path to any ``config.json``. The fields are read
by what they are, not by ``model_type``:

- routed experts: ``n_routed_experts`` (DeepSeek), ``num_local_experts`` (Mixtral) or ``num_experts``
  (Qwen-MoE, OLMoE); none of them (or 0) means a dense model;
- expert FFN width: ``moe_intermediate_size`` when present (then ``intermediate_size`` is the dense FFN
  of the non-MoE layers), else ``intermediate_size`` (Mixtral, OLMoE);
- which layers are MoE: ``first_k_dense_replace`` and ``moe_layer_freq`` (DeepSeek),
  ``decoder_sparse_step`` and ``mlp_only_layers`` (Qwen-MoE), else all;
- shared experts: ``n_shared_experts`` x ``moe_intermediate_size`` (DeepSeek) or one shared expert of
  ``shared_expert_intermediate_size`` (Qwen2-MoE), fused into one FFN of the summed width;
- attention: MLA when ``kv_lora_rank`` is set (``q_lora_rank``, ``qk_nope_head_dim``,
  ``qk_rope_head_dim``, ``v_head_dim``), else MHA/GQA from ``num_key_value_heads`` and ``head_dim``;
- group-limited routing: ``n_group`` / ``topk_group`` (kept; routing cost does not depend on them).

Fields that change nothing moesim times (tokenizer ids, RoPE settings, epsilons, dtypes, ...) are
ignored silently (:data:`IGNORED_FIELDS`); any other field moesim does not model is accepted and named
in a :class:`ConfigWarning`. No torch, no transformers: a plain JSON read, size-checked first.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from moebase.files import read_text_bounded
from moebase.units import MiB
from workloads.catalog import MoEModel

CONFIG_DIR = Path(__file__).parent / "configs"
MAX_CONFIG_BYTES = 4 * MiB

#: fields read into :class:`ModelConfig`
MODELLED_FIELDS = frozenset({
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_local_experts", "num_experts",
    "num_experts_per_tok", "n_shared_experts", "shared_expert_intermediate_size", "first_k_dense_replace",
    "moe_layer_freq", "decoder_sparse_step", "mlp_only_layers", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "tie_word_embeddings",
    "max_position_embeddings", "_source"})

#: fields that do not change time or memory of a training step (no warning)
IGNORED_FIELDS = frozenset({
    "architectures", "model_type", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
    "dtype", "transformers_version", "use_cache", "initializer_range", "rms_norm_eps", "layer_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "attention_dropout", "attention_bias",
    "mlp_bias", "pretraining_tp", "router_aux_loss_coef", "aux_loss_alpha", "output_router_logits",
    "router_jitter_noise", "norm_topk_prob", "routed_scaling_factor", "scoring_func", "topk_method", "seq_aux",
    "ep_size", "max_window_layers", "use_sliding_window", "sliding_window", "quantization_config", "clip_qkv",
    "qkv_bias", "shared_expert_gate"})


class ConfigError(ValueError):
    """A config that cannot be read as a transformer (names the file and the field)."""


class ConfigWarning(UserWarning):
    """A config field moesim accepts but does not model."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of a decoder-only transformer, dense or MoE (names follow Hugging Face configs).

    ``moe_layers``: 0-based indices of the MoE blocks (empty for a dense model); the other blocks use
    a dense SwiGLU FFN of ``intermediate_size``. ``shared_expert_intermediate_size`` is the summed width
    of the shared experts, run as one FFN. MLA fields are 0 for MHA/GQA models (``q_lora_rank`` 0 means
    a full-rank query projection).
    """

    name: str
    source: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    intermediate_size: int
    moe_intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    num_shared_experts: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_group: int = 1
    topk_group: int = 1
    tie_word_embeddings: bool = False
    unmodelled_fields: tuple[str, ...] = ()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0 and len(self.moe_layers) > 0

    @property
    def attention_kind(self) -> str:
        """``mla``, ``mha`` or ``gqa`` (decided by the shape fields)."""
        if self.kv_lora_rank > 0:
            return "mla"
        return "mha" if self.num_key_value_heads == self.num_attention_heads else "gqa"

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def with_layers(self, num_layers: int) -> "ModelConfig":
        """The first ``num_layers`` blocks only (for studies of one block)."""
        import dataclasses
        if not 1 <= num_layers <= self.num_hidden_layers:
            raise ConfigError(f"{self.name}: --layers must lie in 1..{self.num_hidden_layers}, got {num_layers}")
        return dataclasses.replace(self, num_hidden_layers=num_layers,
                                   moe_layers=tuple(i for i in self.moe_layers if i < num_layers))

    def to_moe_model(self) -> MoEModel:
        """The MoE-layer view the layer simulator (:mod:`moesim.sim`) takes."""
        if not self.is_moe:
            raise ConfigError(f"model {self.name!r} is dense: it has no MoE layers")
        return MoEModel(name=self.name, hf_id=self.name, hidden_size=self.hidden_size,
                        moe_intermediate_size=self.moe_intermediate_size, num_experts=self.num_experts,
                        num_experts_per_tok=self.num_experts_per_tok, num_shared_experts=self.num_shared_experts,
                        shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                        num_layers=self.num_hidden_layers, moe_layers=self.moe_layers, source=self.source)


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.json"))


def load_config(spec: str | Path, config_dir: Path = CONFIG_DIR) -> ModelConfig:
    """A shipped config by name or any ``config.json`` path; warns (ConfigWarning) naming unmodelled fields."""
    path = Path(spec)
    if not path.suffix == ".json" or not path.exists():
        named = config_dir / f"{spec}.json"
        if not named.exists():
            raise ConfigError(f"no model config named or found at {str(spec)!r}; shipped: "
                              f"{', '.join(available_configs(config_dir))} (or pass a config.json path)")
        path = named
    text = read_text_bounded(path, MAX_CONFIG_BYTES, "model config.json", error=ConfigError)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    cfg = parse_config(raw, name=path.stem if path.parent == config_dir else str(path), where=str(path))
    if cfg.unmodelled_fields:
        warnings.warn(f"{path}: fields moesim does not model (ignored): {', '.join(cfg.unmodelled_fields)}",
                      ConfigWarning, stacklevel=2)
    return cfg


class _Fields:
    """Typed access to a raw config dict, errors naming the file and field."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def int(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        v = self.raw.get(key, default)
        if v is None:
            if default is None and key not in self.raw:
                raise ConfigError(f"{self.where}: missing field {key!r}")
            return 0 if default is None else default
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{self.where}: field {key!r} must be an integer >= {minimum}, got {v!r}")
        return v

    def first(self, *keys: str) -> int:
        for k in keys:
            if self.raw.get(k) is not None:
                return self.int(k)
        return 0


def parse_config(raw: dict, *, name: str, where: str) -> ModelConfig:
    """A :class:`ModelConfig` from a parsed ``config.json`` dict (see the module docstring)."""
    f = _Fields(raw, where)
    hidden = f.int("hidden_size", minimum=1)
    layers = f.int("num_hidden_layers", minimum=1)
    heads = f.int("num_attention_heads", minimum=1)
    kv_heads = f.int("num_key_value_heads", heads, minimum=1)
    if heads % kv_heads:
        raise ConfigError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    experts = f.first("n_routed_experts", "num_local_experts", "num_experts")
    has_moe_width = raw.get("moe_intermediate_size") is not None
    dense_ffn = f.int("intermediate_size", minimum=1)
    moe = _moe_fields(f, raw, experts, layers, has_moe_width, dense_ffn) if experts > 0 else {}
    mla = _mla_fields(f) if raw.get("kv_lora_rank") else {}
    tie = raw.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise ConfigError(f"{where}: field 'tie_word_embeddings' must be true or false, got {tie!r}")
    unknown = tuple(sorted(set(raw) - MODELLED_FIELDS - IGNORED_FIELDS))
    return ModelConfig(name=name, source=str(raw.get("_source", where)), hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=f.int("head_dim", hidden // heads, minimum=1), vocab_size=f.int("vocab_size", minimum=1),
                       intermediate_size=dense_ffn, tie_word_embeddings=tie, unmodelled_fields=unknown, **moe, **mla)


def _moe_fields(f: _Fields, raw: dict, experts: int, layers: int, has_moe_width: bool, dense_ffn: int) -> dict:
    where = f.where
    top_k = f.int("num_experts_per_tok", minimum=1)
    if top_k > experts:
        raise ConfigError(f"{where}: num_experts_per_tok {top_k} exceeds the {experts} routed experts")
    width = f.int("moe_intermediate_size", minimum=1) if has_moe_width else dense_ffn
    n_shared = f.int("n_shared_experts", 0)
    if n_shared:
        shared_width = n_shared * width
    else:
        shared_width = f.int("shared_expert_intermediate_size", 0)
        n_shared = 1 if shared_width else 0
    first_dense = f.int("first_k_dense_replace", 0)
    freq = f.int("moe_layer_freq", 1, minimum=1)
    step = f.int("decoder_sparse_step", 1, minimum=1)
    mlp_only = raw.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(f"{where}: field 'mlp_only_layers' must be a list of layer indices")
    moe_layers = tuple(i for i in range(layers) if i >= first_dense and i % freq == 0
                       and (i + 1) % step == 0 and i not in set(mlp_only))
    n_group, topk_group = f.int("n_group", 1, minimum=1), f.int("topk_group", 1, minimum=1)
    if experts % n_group or topk_group > n_group:
        raise ConfigError(f"{where}: n_group {n_group} must divide the {experts} experts and be >= "
                          f"topk_group {topk_group}")
    return dict(moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=top_k,
                num_shared_experts=n_shared, shared_expert_intermediate_size=shared_width, moe_layers=moe_layers,
                n_group=n_group, topk_group=topk_group)


def _mla_fields(f: _Fields) -> dict:
    return dict(q_lora_rank=f.int("q_lora_rank", 0), kv_lora_rank=f.int("kv_lora_rank", minimum=1),
                qk_nope_head_dim=f.int("qk_nope_head_dim", minimum=1),
                qk_rope_head_dim=f.int("qk_rope_head_dim", minimum=0),
                v_head_dim=f.int("v_head_dim", minimum=1))
