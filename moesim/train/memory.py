"""Bytes per device of a training step: parameters, gradients, optimizer states and activations.

Mixed-precision Adam as in the ZeRO paper (Rajbhandari et al., 2020, section 3.1): per parameter 2 bytes
of bf16 weights, 2 bytes of bf16 gradients and K = 12 bytes of optimizer states (fp32 master copy,
momentum, variance). ZeRO stage 1 shards the optimizer states over the ``N_d`` data-parallel ranks,
stage 2 also the gradients, stage 3 also the weights: ``(2 + 2 + 12) Psi`` -> ``(2 + 2 + 12 / N_d) Psi``
-> ``(2 + 14 / N_d) Psi`` -> ``16 Psi / N_d``. Dense parameters shard over the ``dp x cp`` ranks that hold
them (Megatron's distributed optimizer shards over the data-parallel group with context parallel), expert
parameters over their ``tp * cp * dp / (ep * etp)`` expert-data-parallel replicas; a device holds ``1 / etp``
of each of its experts' weights (expert tensor parallel).

Activations stored for the backward pass, per block, micro-batch and device (``t`` tokens of the device's
context-parallel chunk, ``b s / cp``; ``tp`` ranks with sequence parallelism, ``e`` bytes per element; heads
per device as in :func:`moesim.train.layers.attention_dims`):

- attention: norm input and output ``2 t h e / tp``; MLA latent inputs of the up-projections
  ``t (q_lora + kv_lora + rope) e``; Q, K, V; output O and the fp32 log-sum-exp;
- dense SwiGLU FFN: norm input and output ``2 t h e / tp``, gate/up output ``2 t f e / tp`` and the
  activation ``t f e / tp``;
- MoE: norm input/output, router probabilities (fp32), per received choice ``x`` (busiest device):
  expert input ``x h e``, gate/up ``2 x f e``, activation ``x f e`` and output ``x h e``; with expert tensor
  parallel ``etp`` the input is the etp group's all-gathered ``etp x h e`` and gate/up and activation are
  ``etp x`` choices at ``f / etp`` width (the same bytes); shared experts like a dense FFN on ``t / tp`` tokens;
- ``selective`` recomputation (Megatron-Core's ``layernorm``, ``core_attn``, ``mla_up_proj`` and
  activation modules; DeepSeek-V3 recomputes norms and MLA up-projections) drops the norm outputs, O
  and the log-sum-exp, the SwiGLU activations and, for MLA, Q, K and V (kept: the latents);
- ``full`` recomputation keeps only each block's input ``t h e / tp`` and, during one block's
  backward, that block's full set.

The last stage adds the fp32 logits ``t V / tp * 4`` of one micro-batch.

Communication buffers (category ``comm_buffers``, transient, one micro-batch's): the all-to-all's receive
buffer of the dispatch and send buffer of the combine on the busiest device, ``x h`` elements each in their
wire dtypes (:func:`hwmodels.collectives.a2a_payload_bytes`: FP8 dispatch with its scales under FP8
training, BF16 combine), plus with ``etp > 1`` the expert-tensor-parallel all-gather's output ``etp x h`` in
the dispatch dtype; or, if larger, the sequence-parallel all-gather's output ``t h e`` (tp > 1); plus,
with pipeline parallelism, a send and a receive buffer of the activation shard ``2 t h e / tp``, and with
context parallelism the ring's send and receive buffers of K/V and of their gradients (4 chunks,
:func:`moesim.train.layers.kv_chunk_bytes`). NCCL's own
internal buffers and gradient buckets (views of the gradient buffer in Megatron) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwmodels.collectives import a2a_payload_bytes
from hwmodels.roofline import DTYPE_BYTES
from moesim.train.layers import FP32_BYTES, Shape, attention_dims, attention_linears, kv_chunk_bytes
from moesim.train.ops import precise_dtype
from workloads.catalog import swiglu_params
from workloads.hf_config import ModelConfig

WEIGHT_BYTES, GRAD_BYTES, ADAM_STATE_BYTES = 2, 2, 12


@dataclass(frozen=True)
class ParamCount:
    """Parameters held by one device before ZeRO sharding: dense (sharded over dp) and expert (over expert-dp)."""

    dense: float
    expert: float

    def __add__(self, other: "ParamCount") -> "ParamCount":
        return ParamCount(self.dense + other.dense, self.expert + other.expert)


def zero_bytes(params: float, zero: int, shards: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of ``params`` parameters at ZeRO stage ``zero`` over ``shards`` ranks."""
    n = max(shards, 1)
    return {"weights": params * WEIGHT_BYTES / (n if zero >= 3 else 1),
            "gradients": params * GRAD_BYTES / (n if zero >= 2 else 1),
            "optimizer": params * ADAM_STATE_BYTES / (n if zero >= 1 else 1)}


def block_params(cfg: ModelConfig, layer: int, tp: int, ep: int, etp: int = 1) -> ParamCount:
    """Parameters of block ``layer`` on one device (tensor-parallel shard, its experts' ``1 / etp`` slices)."""
    h = cfg.hidden_size
    dense = float(sum(n * k for n, k, _ in attention_linears(cfg, tp))) + 2 * h
    expert = 0.0
    if cfg.is_moe_layer(layer):
        dense += cfg.num_experts * h + swiglu_params(h, cfg.shared_expert_intermediate_size)
        expert = cfg.num_experts / ep * swiglu_params(h, cfg.moe_intermediate_size) / etp
    else:
        dense += swiglu_params(h, max(1, cfg.intermediate_size // tp))
    return ParamCount(dense, expert)


def embedding_params(cfg: ModelConfig, tp: int, first: bool, last: bool) -> ParamCount:
    """Embedding (first stage) and LM head + final norm (last stage); a tied head on a one-stage model counts once."""
    table = cfg.vocab_size / tp * cfg.hidden_size
    n = (table if first else 0.0) + (table + cfg.hidden_size if last else 0.0)
    if first and last and cfg.tie_word_embeddings:
        n -= table
    return ParamCount(n, 0.0)


def block_activation_bytes(cfg: ModelConfig, layer: int, sh: Shape, recompute: str, dtype_bytes: int,
                           expert_choices: float) -> float:
    """Bytes block ``layer`` keeps for its backward pass per micro-batch (see the module docstring)."""
    e, h, t, tp = dtype_bytes, cfg.hidden_size, float(sh.tokens), sh.tp
    if recompute == "full":
        return t * h * e / tp
    heads, kv, d_qk, d_v, _ = attention_dims(cfg, tp)
    keep = 1.0 if recompute == "none" else 0.0  # what selective recomputation drops
    norms = (1 + keep) * t * h * e / tp
    qkv = t * (heads * d_qk + kv * d_qk + kv * d_v) * e
    attn = norms + keep * (t * heads * d_v * e + t * heads * FP32_BYTES)
    if cfg.attention_kind == "mla":
        attn += t * (cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * e + keep * qkv
    else:
        attn += qkv
    if cfg.is_moe_layer(layer):
        x, f, fs = expert_choices, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
        ffn = norms + t / tp * cfg.num_experts * FP32_BYTES + x * ((sh.etp + 1) * h + (2 + keep) * f) * e
        ffn += t / tp * (2 + keep) * fs * e
    else:
        f = max(1, cfg.intermediate_size // tp)
        ffn = norms + t * (2 + keep) * f * e
    return attn + ffn


def comm_buffer_bytes(cfg: ModelConfig, sh: Shape, dtype: str, expert_choices: float, pp: int) -> float:
    """Transient communication buffers of one device and micro-batch (see the module docstring)."""
    h, e = cfg.hidden_size, DTYPE_BYTES[precise_dtype(dtype)]
    a2a = a2a_payload_bytes(expert_choices, h, dtype) + a2a_payload_bytes(expert_choices, h, precise_dtype(dtype))
    if sh.etp > 1:
        a2a += a2a_payload_bytes(expert_choices * sh.etp, h, dtype)
    gather = float(sh.tokens) * h * e if sh.tp > 1 else 0.0
    p2p = 2.0 * sh.sp_tokens * h * e if pp > 1 else 0.0
    ring = 4.0 * kv_chunk_bytes(cfg, sh, e) if sh.cp > 1 else 0.0
    return max(a2a, gather) + p2p + ring


def logits_bytes(cfg: ModelConfig, sh: Shape) -> float:
    return float(sh.tokens) * cfg.vocab_size / sh.tp * FP32_BYTES
