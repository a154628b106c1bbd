"""Routing-trace statistics: per-layer expert load and imbalance, inter-layer affinity, temporal
locality and co-activation. Pure functions of a :class:`workloads.trace.Trace` (no I/O, no plotting).

Conventions. ``L`` = ``trace.meta.num_layers``, ``E`` = ``trace.meta.num_experts``. A *token* is a
distinct ``(step, token)`` pair. All functions accept variable-k traces (``meta.extra["variable_k"]``).

Public functions (used by placement / memory / studies):

- :func:`expert_load` ``[L, E]`` selection counts; :func:`load_fraction` ``[L, E]`` rows summing to 1.
- :func:`imbalance` ``[L]`` max/mean; :func:`load_entropy` ``[L]`` bits; :func:`gini` ``[L]``; the same of any
  load array ``[..., E]`` (a load table, device loads): :func:`max_over_mean`, :func:`entropy_bits_of`, :func:`gini_of`.
- :func:`affinity` ``[E, E]`` P(expert j at layer l+1 | expert i at layer l); :func:`affinity_matrices`
  ``[L-1, E, E]``; :func:`pair_counts` the raw ``[E, E]`` counts behind them (:func:`pair_count_matrices`
  for all layers at once).
- :func:`temporal_locality` ``[L]`` mean overlap of consecutive tokens' expert sets.
- :func:`coactivation` ``[E, E]`` how often two experts serve the same token in one layer.
- :func:`tvd` total-variation distance between two distributions; :func:`layer_summary` rows for tables.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from workloads.trace import Trace


def tvd(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance 0.5 * sum|p - q| after normalising both (any shape, same shape)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    q = np.asarray(q, dtype=np.float64).ravel()
    if p.shape != q.shape:
        raise ValueError(f"tvd: shapes differ: {p.shape} vs {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("tvd: a distribution has zero total mass")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def expert_load(trace: Trace) -> np.ndarray:
    """Selections per expert per layer, ``[L, E]`` int64 (a token choosing k experts adds k)."""
    return trace.expert_load()


def load_fraction(trace: Trace) -> np.ndarray:
    """Share of a layer's selections that each expert gets, ``[L, E]`` float64, rows sum to 1
    (rows of layers absent from the trace are 0)."""
    load = expert_load(trace).astype(np.float64)
    tot = load.sum(axis=1, keepdims=True)
    return np.divide(load, tot, out=np.zeros_like(load), where=tot > 0)


def imbalance(trace: Trace) -> np.ndarray:
    """Max over mean expert load per layer, ``[L]`` (1.0 = perfectly balanced)."""
    return max_over_mean(expert_load(trace))


def max_over_mean(load: np.ndarray) -> np.ndarray:
    """Max over mean along the last axis (1.0 = balanced); 0 where the mean is 0."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.divide(load.max(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0)


def load_entropy(trace: Trace) -> np.ndarray:
    """Shannon entropy of each layer's load distribution in bits, ``[L]`` (max log2(E))."""
    return entropy_bits_of(expert_load(trace))


def entropy_bits_of(load: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of the distribution along the last axis of a non-negative load array
    ``[..., E]`` (0 where the load is all zero)."""
    load = np.asarray(load, dtype=np.float64)
    tot = load.sum(axis=-1, keepdims=True)
    p = np.divide(load, tot, out=np.zeros_like(load), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def gini(trace: Trace) -> np.ndarray:
    """Gini coefficient of each layer's expert load, ``[L]`` (0 = equal, 1 - 1/E = one expert takes all)."""
    return gini_of(expert_load(trace))


def gini_of(load: np.ndarray) -> np.ndarray:
    """Gini coefficient along the last axis of a non-negative load array ``[..., E]``."""
    x = np.sort(np.asarray(load, dtype=np.float64), axis=-1)
    n = x.shape[-1]
    tot = x.sum(axis=-1)
    idx = np.arange(1, n + 1)
    num = ((2 * idx - n - 1) * x).sum(axis=-1)
    return np.divide(num, n * tot, out=np.zeros_like(tot), where=tot > 0)


def _token_index(trace: Trace) -> tuple[np.ndarray, int]:
    """Row -> dense token index (distinct (step, token) pairs in (step, token) order) and the token count."""
    step = trace.columns["step"].astype(np.int64)
    tok = trace.columns["token"].astype(np.int64)
    key = step * (int(tok.max(initial=0)) + 1) + tok
    uniq, inv = np.unique(key, return_inverse=True)
    return inv.astype(np.int64), int(uniq.size)


def incidence(trace: Trace, layer: int, token_index: tuple[np.ndarray, int] | None = None) -> sparse.csr_matrix:
    """Token x expert 0/1 matrix of one layer, ``[tokens, E]`` (tokens = all distinct (step, token) of the trace).
    ``token_index``: :func:`_token_index` of the trace, when the caller already has it."""
    _check_layer(trace, layer)
    tidx, n_tok = token_index if token_index is not None else _token_index(trace)
    m = trace.columns["layer"] == layer
    data = np.ones(int(m.sum()), dtype=np.float64)
    return sparse.csr_matrix((data, (tidx[m], trace.columns["expert"][m])), shape=(n_tok, trace.meta.num_experts))


def _check_layer(trace: Trace, layer: int, need_next: bool = False) -> None:
    top = trace.meta.num_layers - (1 if need_next else 0)
    if not 0 <= layer < top:
        what = "layer with a next layer" if need_next else "layer"
        raise ValueError(f"{what} {layer} out of range: trace has num_layers={trace.meta.num_layers}")


def pair_counts(trace: Trace, layer: int, next_layer: int | None = None) -> np.ndarray:
    """Counts of (expert i at ``layer``, expert j at ``next_layer``) over tokens and all k x k choice
    pairs, ``[E, E]`` float64. ``next_layer`` defaults to ``layer + 1``."""
    nxt = layer + 1 if next_layer is None else next_layer
    _check_layer(trace, layer)
    _check_layer(trace, nxt)
    a, b = incidence(trace, layer), incidence(trace, nxt)
    return np.asarray((a.T @ b).todense(), dtype=np.float64)


def pair_count_matrices(trace: Trace) -> np.ndarray:
    """:func:`pair_counts` of every consecutive layer pair, ``[L-1, E, E]`` int64 (empty for one layer)."""
    e, n_layers = trace.meta.num_experts, trace.meta.num_layers
    out = np.zeros((max(n_layers - 1, 0), e, e), dtype=np.int64)
    if n_layers < 2:
        return out
    index = _token_index(trace)
    inc = [incidence(trace, layer, index) for layer in range(n_layers)]
    for layer in range(n_layers - 1):
        out[layer] = np.rint((inc[layer].T @ inc[layer + 1]).toarray()).astype(np.int64)
    return out


def affinity(trace: Trace, layer: int, *, smoothing: float = 0.0) -> np.ndarray:
    """P(expert j chosen at layer+1 | expert i chosen at layer), ``[E, E]`` float64, rows sum to 1.

    Counted over every token and every (choice at l, choice at l+1) pair. Rows of experts never chosen
    at ``layer`` are the next layer's load distribution. ``smoothing`` adds that many pseudo-pairs per row,
    spread like the next layer's load (shrinks sparse rows toward independence).
    """
    _check_layer(trace, layer, need_next=True)
    c = pair_counts(trace, layer)
    nxt = load_fraction(trace)[layer + 1]
    c = c + smoothing * nxt[None, :]
    rows = c.sum(axis=1, keepdims=True)
    return np.where(rows > 0, c / np.where(rows > 0, rows, 1), nxt[None, :])


def affinity_matrices(trace: Trace, *, smoothing: float = 0.0) -> np.ndarray:
    """All consecutive-layer affinity matrices, ``[L-1, E, E]`` (empty ``[0, E, E]`` for one layer)."""
    e = trace.meta.num_experts
    out = np.zeros((max(trace.meta.num_layers - 1, 0), e, e))
    for layer in range(trace.meta.num_layers - 1):
        out[layer] = affinity(trace, layer, smoothing=smoothing)
    return out


def coactivation(trace: Trace, layer: int) -> np.ndarray:
    """How many tokens chose both expert i and expert j in ``layer``, ``[E, E]`` float64 (diagonal = load)."""
    a = incidence(trace, layer)
    return np.asarray((a.T @ a).todense(), dtype=np.float64)


def temporal_locality(trace: Trace) -> np.ndarray:
    """Mean fraction of a token's experts that the previous token (same step, same ``sequence`` if the
    column exists, token index one less) also chose, per layer, ``[L]`` in [0, 1].

    Fraction = |S_t intersect S_{t-1}| / |S_t|. Random independent choice of k of E gives about k / E.
    """
    cols = trace.columns
    out = np.zeros(trace.meta.num_layers)
    tidx, _ = _token_index(trace)
    # tokens in (step, token) order; token t-1 is a predecessor if same step (and sequence) and token-1
    step_of = np.zeros(tidx.max() + 1, dtype=np.int64)
    tok_of = np.zeros(tidx.max() + 1, dtype=np.int64)
    seq_of = np.zeros(tidx.max() + 1, dtype=np.int64)
    step_of[tidx] = cols["step"]
    tok_of[tidx] = cols["token"]
    if "sequence" in cols:
        seq_of[tidx] = cols["sequence"]
    has_prev = np.zeros(tidx.max() + 1, dtype=bool)
    has_prev[1:] = (step_of[1:] == step_of[:-1]) & (tok_of[1:] == tok_of[:-1] + 1) & (seq_of[1:] == seq_of[:-1])
    for layer in range(trace.meta.num_layers):
        if not np.any(cols["layer"] == layer):
            continue
        a = incidence(trace, layer)
        cur = a[1:][has_prev[1:]]
        prev = a[:-1][has_prev[1:]]
        if cur.shape[0] == 0:
            continue
        overlap = np.asarray(cur.multiply(prev).sum(axis=1)).ravel()
        size = np.asarray(cur.sum(axis=1)).ravel()
        ok = size > 0
        out[layer] = float((overlap[ok] / size[ok]).mean()) if ok.any() else 0.0
    return out


def layer_summary(trace: Trace) -> list[dict]:
    """One row per layer: tokens, imbalance (max/mean), entropy (bits and share of log2 E), Gini, locality."""
    load = expert_load(trace)
    ent = load_entropy(trace)
    loc = temporal_locality(trace)
    imb, g = imbalance(trace), gini(trace)
    e = trace.meta.num_experts
    rows = []
    for layer in range(trace.meta.num_layers):
        rows.append({"layer": layer, "selections": int(load[layer].sum()), "max_over_mean": float(imb[layer]),
                     "entropy_bits": float(ent[layer]),
                     "entropy_share": float(ent[layer] / np.log2(e)) if e > 1 else 1.0,
                     "gini": float(g[layer]), "temporal_locality": float(loc[layer]),
                     "experts_unused": int((load[layer] == 0).sum())})
    return rows
