"""The operators of one micro-batch on one device, for every block of the model except the MoE part.

Per block (pre-norm transformer): ``norm`` -> attention (projections as GEMMs in phase ``attention``, the
FlashAttention-style fused core as a kernel in phase ``attention_core``) -> ``norm`` -> dense SwiGLU
FFN (``dense_ffn``; MoE blocks get their FFN from :mod:`moesim.train.moe`). The first pipeline stage adds the ``embedding``, the last the final norm,
``lm_head`` GEMM and the ``loss``. Tokens per micro-batch ``t = micro_batch_size * seq_len``; tensor
parallel ``tp`` splits heads and FFN columns; with ``tp > 1`` sequence parallelism adds an all-gather
before and a reduce-scatter after each attention and dense-FFN block (phase ``tp_comm``; swapped in the
backward pass) and norms see ``t / tp`` tokens.

FlashAttention core, per device (``a`` = heads / tp, ``d_qk``, ``d_v`` head dims, ``c`` = 1/2 causal):
forward FLOPs ``2 * b * a * s^2 * (d_qk + d_v) * c``; bytes: read Q, K, V, write O (and the fp32
log-sum-exp); backward (input gradients only; the core has no weights) 2.5x the forward FLOPs
(FlashAttention-2: five matmuls against two, recomputing S) and twice the bytes. Without a cost-model
``kernel`` method the forward runs at the speed of a GEMM of the same FLOPs (:mod:`moesim.train.ops`) and the
backward at 2.5 times that GEMM's time: its five matmuls have the forward's shapes (inner dimension a head
dimension or a key block), so it gets no better efficiency than the forward (FlashAttention-2, Dao 2023,
arXiv:2307.08691: the backward reaches a lower share of peak than the forward).

Context parallelism (``cp > 1``, Megatron-Core's ring attention, ``--cp-comm-type p2p``): a device holds
``t / cp`` tokens of each micro-batch (chunks ``i`` and ``2 cp - 1 - i`` of ``2 cp``: Megatron's
``get_batch_on_this_cp_rank``), so every operator except the attention core works on ``t / cp`` tokens.
The core of a rank computes its local queries against all keys in ``cp`` block steps; with the two-chunk
split each step is the same work and the rank's FLOPs are exactly ``1 / cp`` of the sequence's causal core
(its bytes: local Q and O, every rank's K and V once). Between steps each rank sends its current K/V chunk
(``b (s / cp) kv (d_qk + d_v)`` elements, the rank's kv heads) to the next rank of the CP group (ranks
``tp`` apart, Megatron's order) while the step computes: the forward moves ``cp - 1`` chunks and exposes
``(cp - 1) max(0, hop - core / cp)`` (phase ``cp_comm``); the backward re-circulates K/V and their
gradients, ``2 (cp - 1)`` chunks in ``cp`` hops, against the backward core the same way (Megatron-LM
``docs/source/api-guide/context_parallel.rst``: KV is gathered again in backward, KV gradients are
reduce-scattered, both as ring point-to-point transfers; Transformer Engine's ``AttnFuncWithCPAndKVP2P``
overlaps each step's compute with the next step's transfer and, backward, sends K/V on the first hop, K/V
and dK/dV on the middle ones and dK/dV on the last).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hwmodels.collectives import COMM_KERNEL_SMS
from hwmodels.cost import overlapped_cost
from hwmodels.roofline import DTYPE_BYTES
from hwmodels.specs import System
from moesim.train.collectives import collective_time_s
from moesim.train.ops import BACKWARD_INPUT, BACKWARD_WEIGHT, COMMUNICATION, FORWARD, Kernel, Op, Timer
from moesim.train.overlap import TE_KERNEL, TE_PIPELINE_SPLITS, tp_overlap_s
from workloads.hf_config import ModelConfig

CAUSAL_FRACTION = 0.5
FA_BACKWARD_FLOPS_RATIO = 2.5
FP32_BYTES = 4


@dataclass(frozen=True)
class Shape:
    """What one device computes for one micro-batch: ``b`` sequences of ``s`` tokens, tensor parallel ``tp``,
    context parallel ``cp`` and expert tensor parallel ``etp``."""

    micro_batch_size: int
    seq_len: int
    tp: int
    cp: int = 1
    etp: int = 1

    @property
    def tokens(self) -> int:
        """Tokens of the micro-batch on this context-parallel rank (all of them with ``cp = 1``)."""
        return -(-self.micro_batch_size * self.seq_len // self.cp)

    @property
    def sp_tokens(self) -> int:
        """Tokens a device holds between blocks (sequence parallel shard)."""
        return -(-self.tokens // self.tp)


def _div(x: int, tp: int) -> int:
    """A dimension split over tp ranks (at least 1: replicated heads)."""
    return max(1, x // tp)


def attention_dims(cfg: ModelConfig, tp: int) -> tuple[int, int, int, int, int]:
    """(query heads, kv heads, d_qk, d_v) per device and the per-device width of the attention output."""
    if cfg.attention_kind == "mla":
        heads = _div(cfg.num_attention_heads, tp)
        d_qk, d_v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        return heads, heads, d_qk, d_v, heads * d_v
    heads, kv = _div(cfg.num_attention_heads, tp), _div(cfg.num_key_value_heads, tp)
    return heads, kv, cfg.head_dim, cfg.head_dim, heads * cfg.head_dim


def core_attention_kernels(cfg: ModelConfig, sh: Shape, dtype_bytes: int) -> tuple[Kernel, Kernel]:
    """Forward and backward work of the fused causal attention core (see the module docstring); their GEMM
    equivalents are ``[b a s / cp, d_qk + d_v] x [d_qk + d_v, s / 2]`` (forward) and 2.5 of those (backward);
    with context parallelism one rank's share, ``1 / cp`` of the FLOPs (module docstring)."""
    heads, kv, d_qk, d_v, _ = attention_dims(cfg, sh.tp)
    b, s, cp = sh.micro_batch_size, sh.seq_len, sh.cp
    flops = 2.0 * b * heads * s * s * (d_qk + d_v) * CAUSAL_FRACTION / cp
    local = b * s / cp  # query tokens of this rank
    io = (local * heads * (d_qk + d_v) + b * s * kv * (d_qk + d_v)) * dtype_bytes + local * heads * FP32_BYTES
    m, n = -(-b * heads * s // cp), max(1, int(round(s * CAUSAL_FRACTION)))
    return (Kernel("flash_attention_fwd", flops, io, (m, n, d_qk + d_v)),
            Kernel("flash_attention_bwd", FA_BACKWARD_FLOPS_RATIO * flops, 2.0 * io, (m, n, d_qk + d_v),
                   FA_BACKWARD_FLOPS_RATIO))


def attention_linears(cfg: ModelConfig, tp: int) -> list[tuple[int, int, str]]:
    """(n, k, phase) of each attention projection per device ([t, k] x [k, n]). MLA down-projections are
    replicated over tp ranks (as in Megatron-Core); its up-projections are phase ``attention_up`` (what
    selective recomputation re-runs), every other projection phase ``attention``."""
    h = cfg.hidden_size
    heads, kv, d_qk, d_v, out = attention_dims(cfg, tp)
    if cfg.attention_kind != "mla":
        return [((heads + 2 * kv) * cfg.head_dim, h, "attention"), (h, out, "attention")]
    rope, kvr, qr = cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    q = [(qr, h, "attention"), (heads * d_qk, qr, "attention_up")] if qr else [(heads * d_qk, h, "attention")]
    return q + [(kvr + rope, h, "attention"), (heads * (cfg.qk_nope_head_dim + d_v), kvr, "attention_up"),
                (h, out, "attention")]


#: phases whose forward ``selective`` recomputation re-runs in the backward pass (recomputing the core under
#: context parallelism re-runs its ring: ``cp_comm``, exposed part)
SELECTIVE_RECOMPUTE_PHASES = ("norm", "attention_core", "attention_up", "cp_comm")


def norm_ops(timer: Timer, layer: int, phase: str, tokens: int, width: int) -> list[Op]:
    """RMSNorm: forward reads and writes the activations; backward reads x and dy, writes dx."""
    b = DTYPE_BYTES[timer.precise_dtype]
    n = float(tokens) * width
    return [timer.kernel(layer, phase, FORWARD, Kernel("rmsnorm_fwd", 4 * n, 2 * n * b)),
            timer.kernel(layer, phase, BACKWARD_INPUT, Kernel("rmsnorm_bwd", 8 * n, 3 * n * b))]


def block_ops(cfg: ModelConfig, layer: int, sh: Shape, timer: Timer, system: System, *,
              tp_overlap: bool = False) -> list[Op]:
    """All operators of block ``layer`` except the MoE part (attention, norms, dense FFN, TP comms); ``tp_overlap``:
    the TP comms overlap their GEMMs as Transformer Engine's userbuffers do (:func:`tp_beside`)."""
    t, h = sh.tokens, cfg.hidden_size
    attn = attention_linears(cfg, sh.tp)
    ops = norm_ops(timer, layer, "norm", sh.sp_tokens, h)
    for n, k, phase in attn:
        ops += timer.linear(layer, phase, t, n, k)
    fwd, bwd = core_attention_kernels(cfg, sh, DTYPE_BYTES[timer.precise_dtype])
    core = [timer.kernel(layer, "attention_core", FORWARD, fwd),
            timer.kernel(layer, "attention_core", BACKWARD_INPUT, bwd)]
    ops += core + cp_ring_ops(system, layer, sh, kv_chunk_bytes(cfg, sh, DTYPE_BYTES[timer.precise_dtype]),
                              core[0].time_s, core[1].time_s)
    gathered = [(n, k) for n, k, _ in attn[:-1] if k == h]  # the GEMMs reading the all-gathered input
    beside = tp_beside(timer, t, gathered, attn[-1][:2], sh.tp) if tp_overlap else None
    ops += sp_comm_ops(system, layer, sh, h, timer.precise_dtype, beside)
    ops += norm_ops(timer, layer, "norm", sh.sp_tokens, h)
    if not cfg.is_moe_layer(layer):
        f = _div(cfg.intermediate_size, sh.tp)
        ops += timer.linear(layer, "dense_ffn", t, 2 * f, h) + timer.linear(layer, "dense_ffn", t, h, f)
        beside = tp_beside(timer, t, [(2 * f, h)], (h, f), sh.tp) if tp_overlap else None
        ops += sp_comm_ops(system, layer, sh, h, timer.precise_dtype, beside)
    return ops


def tp_beside(timer: Timer, tokens: int, first: list[tuple[int, int]], last: tuple[int, int], tp: int) -> tuple:
    """The GEMMs a tensor-parallel block's SP collectives overlap under TE's userbuffers
    (:func:`moesim.train.overlap.tp_overlap_s`): first GEMMs forward (ring exchange: chunks of ``tokens / tp`` rows),
    their weight gradient (bulk: whole), last GEMM forward (pipelined: ``tokens / TE_PIPELINE_SPLITS`` rows), its
    input gradient (ring exchange), each (whole, one chunk, one chunk with :data:`~moesim.train.overlap.TE_KERNEL`'s
    SMs taken) seconds. ``first``: the (n, k) GEMMs reading the gathered input (QKV / MLA down-projections, FC1),
    ``last``: the one whose output is reduce-scattered (projection, FC2)."""
    slow = replace(timer, cost=overlapped_cost(timer.cost, COMM_KERNEL_SMS[TE_KERNEL][0]))  # same dtype and FP8 recipe

    def seconds(tm: Timer, shapes, rows: int, direction: str) -> float:
        return sum(o.time_s for n, k in shapes for o in tm.linear(-1, "tp", rows, n, k) if o.direction == direction)

    out = []
    for shapes, direction, rows in ((first, FORWARD, -(-tokens // tp)), (first, BACKWARD_WEIGHT, tokens),
                                    ([last], FORWARD, -(-tokens // TE_PIPELINE_SPLITS)),
                                    ([last], BACKWARD_INPUT, -(-tokens // tp))):
        chunk = seconds(timer, shapes, rows, direction)
        # the slowed GEMM is never faster (the fitted wave model can say fewer SMs tile better; a GEMM sharing the
        # GPU does not gain from it)
        out.append((seconds(timer, shapes, tokens, direction), chunk, max(chunk, seconds(slow, shapes, rows, direction))))
    return tuple(out)


def sp_comm_ops(system: System, layer: int, sh: Shape, hidden: int, dtype: str,
                beside: tuple | None = None) -> list[Op]:
    """All-gather before and reduce-scatter after one tensor-parallel block, in both passes (tp > 1); with
    ``beside`` (:func:`tp_beside`) the seconds they leave exposed next to their GEMMs
    (:func:`moesim.train.overlap.tp_overlap_s`)."""
    if sh.tp <= 1:
        return []
    nbytes = float(sh.tokens) * hidden * DTYPE_BYTES[dtype]
    ag = collective_time_s(system, "all_gather", nbytes, sh.tp)
    rs = collective_time_s(system, "reduce_scatter", nbytes, sh.tp)
    sent = nbytes * (sh.tp - 1) / sh.tp
    fwd_s, bwd_s = (ag + rs, ag + rs) if beside is None else tp_overlap_s(ag, rs, sh.tp, *beside)
    return [Op(layer, "tp_comm", FORWARD, COMMUNICATION, fwd_s, 0.0, 2 * sent),
            Op(layer, "tp_comm", BACKWARD_INPUT, COMMUNICATION, bwd_s, 0.0, 2 * sent)]


def kv_chunk_bytes(cfg: ModelConfig, sh: Shape, dtype_bytes: int) -> float:
    """Bytes of one context-parallel rank's K and V (its ``t / cp`` tokens, its kv heads): one ring hop."""
    _, kv, d_qk, d_v, _ = attention_dims(cfg, sh.tp)
    return float(sh.tokens) * kv * (d_qk + d_v) * dtype_bytes


def cp_ring_ops(system: System, layer: int, sh: Shape, chunk_bytes: float, fwd_core_s: float,
                bwd_core_s: float) -> list[Op]:
    """Ring attention's K/V passing (cp > 1, module docstring), each hop hidden behind one block step of the core
    (``1 / cp`` of its time): forward ``cp - 1`` hops of one K/V chunk; backward ``cp`` hops, K/V alone on the
    first, the accumulated dK/dV alone on the last and both on the ``cp - 2`` between (2 (cp - 1) chunks). The ops
    carry the exposed seconds and the bytes a rank sends."""
    if sh.cp <= 1:
        return []
    cp = sh.cp

    def exposed(chunks: int, core_s: float) -> float:
        return max(0.0, collective_time_s(system, "send_recv", chunks * chunk_bytes, cp, sh.tp) - core_s / cp)

    fwd = (cp - 1) * exposed(1, fwd_core_s)
    bwd = 2 * exposed(1, bwd_core_s) + (cp - 2) * exposed(2, bwd_core_s)
    return [Op(layer, "cp_comm", FORWARD, COMMUNICATION, fwd, 0.0, (cp - 1) * chunk_bytes),
            Op(layer, "cp_comm", BACKWARD_INPUT, COMMUNICATION, bwd, 0.0, 2 * (cp - 1) * chunk_bytes)]


def embedding_ops(cfg: ModelConfig, sh: Shape, timer: Timer, system: System) -> list[Op]:
    """Vocabulary-parallel embedding lookup (layer -1): gather forward, scatter-add weight gradient."""
    b = DTYPE_BYTES[timer.precise_dtype]
    n = float(sh.tokens) * cfg.hidden_size
    ops = [timer.kernel(-1, "embedding", FORWARD, Kernel("embedding_fwd", 0.0, 2 * n * b)),
           timer.kernel(-1, "embedding", BACKWARD_WEIGHT, Kernel("embedding_bwd", n, 3 * n * b))]
    if sh.tp > 1:  # reduce-scatter of the partial lookups; its gradient is an all-gather
        rs = collective_time_s(system, "reduce_scatter", n * b, sh.tp)
        ag = collective_time_s(system, "all_gather", n * b, sh.tp)
        sent = n * b * (sh.tp - 1) / sh.tp
        ops += [Op(-1, "tp_comm", FORWARD, COMMUNICATION, rs, 0.0, sent),
                Op(-1, "tp_comm", BACKWARD_INPUT, COMMUNICATION, ag, 0.0, sent)]
    return ops


def head_ops(cfg: ModelConfig, sh: Shape, timer: Timer, system: System) -> list[Op]:
    """Final norm, LM-head GEMM over the vocabulary shard and the cross-entropy loss (layer = num layers)."""
    last = cfg.num_hidden_layers
    v = _div(cfg.vocab_size, sh.tp)
    ops = norm_ops(timer, last, "norm", sh.sp_tokens, cfg.hidden_size)
    ops += timer.linear(last, "lm_head", sh.tokens, v, cfg.hidden_size, precise=True)
    logits = float(sh.tokens) * v
    b = DTYPE_BYTES[timer.precise_dtype]
    ops += [timer.kernel(last, "loss", FORWARD, Kernel("cross_entropy_fwd", 5 * logits, logits * b)),
            timer.kernel(last, "loss", BACKWARD_INPUT, Kernel("cross_entropy_bwd", 3 * logits, 2 * logits * b))]
    if sh.tp > 1:
        ag = collective_time_s(system, "all_gather", float(sh.tokens) * cfg.hidden_size * b, sh.tp)
        ops.append(Op(last, "tp_comm", FORWARD, COMMUNICATION, ag, 0.0, 0.0))
        ops.append(Op(last, "tp_comm", BACKWARD_INPUT, COMMUNICATION, ag, 0.0, 0.0))
    return ops
