"""Tiny configs and systems for closed-form training-step tests."""

from __future__ import annotations

from workloads.hf_config import parse_config

DENSE = {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 128,
         "intermediate_size": 96}

FLAME = {"hidden_size": 1024, "num_hidden_layers": 9, "num_attention_heads": 16, "vocab_size": 50304,
         "intermediate_size": 2816, "moe_intermediate_size": 704, "n_routed_experts": 64, "num_experts_per_tok": 6,
         "n_shared_experts": 2, "first_k_dense_replace": 1}


def dense_config(**over):
    return parse_config({**DENSE, **over}, name="dense-toy", where="test")


def flame_config(**over):
    return parse_config({**FLAME, **over}, name="flame-toy", where="test")
