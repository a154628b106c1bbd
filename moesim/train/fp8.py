"""Bytes moved by the FP8 quantization kernels of FP8 training (``TrainSpec.dtype="fp8"``).

Every FP8 GEMM reads FP8 operands, so the BF16 tensors feeding it are cast to FP8 (with their scales) by
memory-bound kernels the GEMM time does not include. Per linear layer ``[m, k] x [k, n]`` (input ``X [m, k]``,
weight ``W [k, n]``, output gradient ``dY [m, n]``) on Hopper, whose FP8 tensor-core GEMMs take both operands
K-major, so the forward (``X W``), input-gradient (``dY W^T``) and weight-gradient (``X^T dY``) GEMMs need ``X``,
``W`` and ``dY`` each in both layouts (row-wise and transposed):

- ``delayed`` (Transformer Engine's delayed scaling, Megatron's default ``--fp8-recipe``): one fused
  cast-transpose kernel per tensor reads it in BF16 (2 B/element) and writes both FP8 copies (2 x 1 B/element);
  the amax is taken inside that kernel and used from the next iteration on (TE ``DelayedScaling``), so no extra
  pass: ``4 E`` bytes for ``E`` elements.
- ``tensorwise`` (TE's per-tensor current scaling, "FP8-CS" of NVIDIA's performance tables): the scale must
  be known before casting, so an amax kernel first reads the tensor once more: ``6 E`` bytes.
- ``blockwise`` (DeepSeek-V3, arXiv:2412.19437 sec. 3.3: activations and gradients scaled per 1x128 tile,
  weights per 128x128 block): the forward casts ``X`` once into 1x128 tiles (``2 E`` read, ``E`` plus one fp32
  scale per 128 values written) and caches it; the backward reads it back, dequantizes, transposes and
  requantizes it into 128x1 tiles for the weight gradient (sec. 3.5.2, "Support for Transposed GEMM
  Operations": ``E`` plus scales read and written); ``dY`` is cast into both tile layouts (``2 E`` read, twice
  ``E`` plus scales written); ``W`` into both layouts of 128x128 blocks (``2 E`` read, twice ``E`` plus one fp32
  scale per block written).
- ``none``: no cast cost (the model before these kernels were added).

Weights are cast once per step, not per micro-batch: Transformer Engine caches the FP8 copy of each weight
between the micro-batches of one step (``is_first_microbatch`` of ``te.Linear.forward``, TE user guide
"FP8 weight caching"). Not modelled: casts fused into a preceding kernel (TE's ``LayerNormLinear`` writing the
norm's output in FP8, DeepSeek's SwiGLU fused with its quantization), which make some of these passes free; so
the casts here are an upper bound for such fused layers.

MoE experts (:func:`expert_cast_bytes`): the two expert linears ``[c, h] x [h, 2f]`` and ``[c, f] x [f, h]`` on
the ``c`` routed choices a device computes, except that the first one's input is quantized before the FP8
dispatch on the device's ``T`` tokens (moesim's FP8 dispatch, :mod:`moesim.train.moe`; DeepSeek-V3 sec. 3.3.2);
under the per-tensor recipes its weight gradient then needs the received FP8 rows transposed (one FP8 read and
one FP8 write per element).
"""

from __future__ import annotations

import math

from hwmodels.collectives import FP8_SCALE_BLOCK, a2a_payload_bytes
from hwmodels.roofline import DTYPE_BYTES

FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "none")
BF16 = DTYPE_BYTES["bf16"]
FP8 = DTYPE_BYTES["fp8"]


def tile_fp8_bytes(rows: float, cols: int) -> float:
    """FP8 bytes of a ``[rows, cols]`` tensor in 1x128 tiles (one fp32 scale per 128 values of a row)."""
    return a2a_payload_bytes(rows, cols, "fp8")


def block_fp8_bytes(rows: int, cols: int) -> float:
    """FP8 bytes of a ``[rows, cols]`` weight in 128x128 blocks (one fp32 scale per block)."""
    blocks = math.ceil(rows / FP8_SCALE_BLOCK) * math.ceil(cols / FP8_SCALE_BLOCK)
    return float(rows) * cols * FP8 + blocks * DTYPE_BYTES["fp32"]


def _per_tensor(elements: float, recipe: str) -> float:
    """Read BF16 (plus one amax pass under ``tensorwise``), write the FP8 copy and its transpose."""
    return elements * (BF16 + 2 * FP8) + (elements * BF16 if recipe == "tensorwise" else 0.0)


def input_cast_bytes(rows: float, cols: int, recipe: str) -> tuple[float, float]:
    """(forward, backward) bytes of casting a linear layer's input ``[rows, cols]`` (module docstring)."""
    if recipe == "none":
        return 0.0, 0.0
    if recipe == "blockwise":
        tiles = tile_fp8_bytes(rows, cols)
        return rows * cols * BF16 + tiles, 2.0 * tiles
    return _per_tensor(float(rows) * cols, recipe), 0.0


def grad_cast_bytes(rows: float, cols: int, recipe: str) -> float:
    """Backward bytes of casting an output gradient ``[rows, cols]`` into both layouts."""
    if recipe == "none":
        return 0.0
    if recipe == "blockwise":
        return rows * cols * BF16 + 2.0 * tile_fp8_bytes(rows, cols)
    return _per_tensor(float(rows) * cols, recipe)


def weight_cast_bytes(rows: int, cols: int, recipe: str) -> float:
    """Bytes of casting a weight ``[rows, cols]`` into both layouts, once per step."""
    if recipe == "none":
        return 0.0
    if recipe == "blockwise":
        return float(rows) * cols * BF16 + 2.0 * block_fp8_bytes(rows, cols)
    return _per_tensor(float(rows) * cols, recipe)


def linear_cast_bytes(m: float, n: int, k: int, recipe: str) -> tuple[float, float, float]:
    """(forward per micro-batch, backward per micro-batch, weight per step) cast bytes of ``[m, k] x [k, n]``."""
    x_fwd, x_bwd = input_cast_bytes(m, k, recipe)
    return x_fwd, x_bwd + grad_cast_bytes(m, n, recipe), weight_cast_bytes(k, n, recipe)


def expert_cast_bytes(tokens: float, choices: float, hidden: int, inter: int, experts: int,
                      recipe: str) -> tuple[float, float, float]:
    """(forward, backward, weight per step) cast bytes of one device's routed experts: ``tokens`` before the
    dispatch, ``choices`` routed (token, expert) rows, ``experts`` local experts of ``hidden`` x ``inter``."""
    if recipe == "none":
        return 0.0, 0.0, 0.0
    fc1_in, _ = input_cast_bytes(tokens, hidden, recipe)  # quantized before the FP8 dispatch
    # the weight gradient's transposed copy of the received rows: blockwise requantizes them into 128x1 tiles,
    # the per-tensor recipes transpose the FP8 rows (one FP8 read and one FP8 write per element)
    fc1_in_bwd = input_cast_bytes(choices, hidden, recipe)[1] if recipe == "blockwise" else choices * hidden * FP8 * 2.0
    fc2 = linear_cast_bytes(choices, hidden, inter, recipe)
    fwd = fc1_in + fc2[0]
    bwd = fc1_in_bwd + grad_cast_bytes(choices, 2 * inter, recipe) + fc2[1]
    weights = experts * (weight_cast_bytes(hidden, 2 * inter, recipe) + fc2[2])
    return fwd, bwd, weights
