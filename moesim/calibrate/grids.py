"""Shape grids of the calibration suite (no torch needed here).

A grid is a list of op specs (dicts with ``op``, ``m``, ``n``, ``k`` and, for the expert FFN, the
``tokens_per_expert`` counts and their ``dist`` label). Expert token counts come from the real
FLAME-MoE-290M routing trace (skewed, per layer) as well as from a uniform split.
"""

from __future__ import annotations

import numpy as np

GRID_NAMES = ("tiny", "small", "default", "full")


def flame_routing(tokens: int, layer: int, num_experts: int, top_k: int) -> np.ndarray:
    """Expert ids [tokens, top_k] of the first ``tokens`` tokens of FLAME-MoE-290M MoE layer ``layer``
    (0..7; tokens beyond 2048 wrap around), keeping the first ``top_k`` <= 6 choices. Experts are
    folded modulo ``num_experts`` when it is below 64 (choices of a token stay distinct only for 64)."""
    from workloads.importers import load_trace

    experts, _ = load_trace("default").dense()  # [2048, 8, 6]
    if not 0 <= layer < experts.shape[1]:
        raise ValueError(f"FLAME trace layer {layer} out of range 0..{experts.shape[1] - 1}")
    if not 1 <= top_k <= experts.shape[2]:
        raise ValueError(f"top_k {top_k} out of range 1..{experts.shape[2]} for the FLAME trace")
    idx = np.arange(tokens) % experts.shape[0]
    return experts[idx, layer, :top_k].astype(np.int64) % num_experts


def tokens_per_expert(dist: str, tokens: int, num_experts: int, top_k: int) -> np.ndarray:
    """Counts [num_experts] of (token, expert) choices: ``uniform`` or ``flame-L<layer>`` (real, skewed)."""
    if dist == "uniform":
        total = tokens * top_k
        base = np.full(num_experts, total // num_experts, dtype=np.int64)
        base[: total % num_experts] += 1
        return base
    if dist.startswith("flame-L"):
        layer = int(dist[len("flame-L"):])
        return np.bincount(flame_routing(tokens, layer, num_experts, top_k).ravel(), minlength=num_experts)
    raise ValueError(f"unknown token distribution {dist!r} (use 'uniform' or 'flame-L0'..'flame-L7')")


def _ffn(tokens, h, f, e, k, dist):
    tpe = tokens_per_expert(dist, tokens, e, k)
    return {"op": "grouped_ffn", "m": int(tpe.sum()), "n": f, "k": h, "num_experts": e, "top_k": k, "dist": dist,
            "tokens_per_expert": tpe.tolist(), "shape": f"T={tokens},h={h},f={f},E={e},k={k},{dist}"}


def make_grid(name: str, *, on_gpu: bool = False) -> list[dict]:
    """The op specs of grid ``name`` (``tiny`` for unit tests, ``small`` for the CI check, ``default``,
    ``full`` for the benchmark). Copies h2d/d2h are only measured on a GPU."""
    if name not in GRID_NAMES:
        raise ValueError(f"unknown grid {name!r}; known: {', '.join(GRID_NAMES)}")
    specs: list[dict] = []
    if name == "tiny":
        gemm_m, gemm_nk = [16, 64, 256], [(128, 128), (256, 512)]
        ffn = [(t, 128, 256, 16, 2, d) for t in (64, 128, 256) for d in ("uniform", "flame-L2")]
        router = [(t, 128, 16, 2) for t in (64, 256)]
        perm = [(t, 128, 2) for t in (64, 256)]
        copies = [2**p for p in (12, 16, 20)]
    elif name == "small":
        gemm_m, gemm_nk = [16, 32, 64, 128, 256], [(256, 256), (512, 256), (256, 512)]
        tokens = (128, 192, 256, 384, 512)
        dists = ("uniform", "flame-L0", "flame-L4", "flame-L7")
        ffn = [(t, 256, 512, 16, 2, d) for t in tokens for d in dists]
        router = [(t, h, e, 2) for t in (64, 256, 1024) for (h, e) in ((256, 16), (512, 64))]
        perm = [(t, 256, 2) for t in (64, 256, 1024)]
        copies = [2**p for p in (12, 14, 16, 18, 20, 22)]
    else:
        full = name == "full"
        gemm_m = [1, 8, 32, 64, 128, 256, 512, 1024] + ([2048, 4096] if full else [])
        gemm_nk = [(512, 512), (1024, 1024), (1408, 1024), (1024, 704), (2048, 1024)] + (
            [(4096, 1024), (1024, 4096)] if full else [])
        tokens = (256, 512, 1024, 2048) + ((4096,) if full else ())
        dists = ("uniform", "flame-L0", "flame-L2", "flame-L4", "flame-L7") + (
            ("flame-L1", "flame-L3", "flame-L5", "flame-L6") if full else ())
        shapes = [(1024, 704, 64, 6), (512, 512, 64, 6)] + ([(1024, 1408, 16, 2), (2048, 704, 64, 6)] if full else [])
        ffn = [(t, h, f, e, k, d) for (h, f, e, k) in shapes for t in tokens for d in dists]
        router = [(t, h, e, k) for t in (64, 256, 1024, 2048, 4096) for (h, e, k) in ((1024, 64, 6), (512, 16, 2))]
        perm = [(t, h, k) for t in (64, 256, 1024, 2048, 4096) for (h, k) in ((1024, 6), (512, 2))]
        copies = [2**p for p in range(12, 29 if full else 27)]
    for m in gemm_m:
        for n, k in gemm_nk:
            specs.append({"op": "gemm", "m": m, "n": n, "k": k, "shape": f"m={m},n={n},k={k}"})
    for t, h, f, e, k, d in ffn:
        specs.append(_ffn(t, h, f, e, k, d))
    for t, h, e, k in router:
        specs.append({"op": "router", "m": t, "n": e, "k": h, "num_experts": e, "top_k": k,
                      "shape": f"T={t},h={h},E={e},k={k}"})
    for t, h, k in perm:
        for op in ("permute", "unpermute"):
            specs.append({"op": op, "m": t, "n": 0, "k": h, "top_k": k, "shape": f"T={t},h={h},k={k}",
                          "dist": "flame-L0"})
    for nbytes in copies:
        for op in ("copy_d2d", "copy_h2d", "copy_d2h") if on_gpu else ("copy_d2d",):
            specs.append({"op": op, "m": nbytes, "n": 0, "k": 0, "shape": f"bytes={nbytes}"})
    return specs
