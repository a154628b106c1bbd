"""Routing-policy what-ifs: re-route captured router logits with another policy and get the trace the
simulator would replay.

Every policy is a plain function ``policy(r: RouterLogits, **options) -> Trace`` named in
``ROUTING_POLICIES``. Weights are softmax probabilities of the logits (renormalised where the policy says
so). Policies that give tokens a varying number of experts set ``meta.extra["variable_k"] = True``; a
token-layer may then have no rows at all (a dropped token).

- ``topk``: top-k, weights renormalised over the k (Mixtral) or raw probabilities (``renormalize=False``).
- ``capacity``: top-k with a per-expert capacity ``ceil(capacity_factor * tokens * k / E)`` per step and
  layer; choices are served rank-major in token order (all first choices, then second, as GShard/Switch)
  and those over capacity are dropped.
- ``top_p``: the fewest experts whose probability mass reaches ``p`` (dynamic routing, variable k).
- ``null_experts``: AdaMoE: ``num_null`` null experts with logit ``null_logit`` join the top-k; choosing one
  means "no computation", so tokens use 0..k real experts.
- ``shared_experts``: DeepSeekMoE: top-k routed experts plus ``num_shared`` always-active experts with ids
  E..E+num_shared-1 (weight 1).
- ``expert_choice``: each expert takes its ``ceil(capacity_factor * tokens / E)`` highest-probability tokens
  per step and layer (Zhou et al. 2022); tokens get 0..E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workloads.trace import Trace, TraceMeta, validate


@dataclass(frozen=True)
class RouterLogits:
    """Router logits of captured tokens: ``logits`` [N, L, E] float32, ``step`` [N], ``token`` [N]
    (token index inside its step), plus the model name and provenance."""

    logits: np.ndarray
    step: np.ndarray
    token: np.ndarray
    model: str
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.logits.shape)  # type: ignore[return-value]


def from_capture(out_dir: str | Path) -> RouterLogits:
    """Router logits recorded by ``moesim.capture(..., record_logits=True)`` as a [N, L, E] block."""
    from workloads.capture import read_logits, read_manifest

    lg = read_logits(out_dir)
    man = read_manifest(out_dir)
    n_l = int(lg["layer"].max()) + 1
    key = lg["step"].astype(np.int64) * (int(lg["token"].max()) + 1) + lg["token"]
    uniq, inv = np.unique(key, return_inverse=True)
    e = lg["logits"].shape[1]
    block = np.full((len(uniq), n_l, e), np.nan, dtype=np.float32)
    block[inv, lg["layer"]] = lg["logits"]
    if np.isnan(block).any():
        raise ValueError(f"{out_dir}: some tokens lack logits for some layers; cannot build [tokens, layers, experts]")
    first = np.zeros(len(uniq), dtype=np.int64)
    first[inv] = np.arange(len(inv))
    return RouterLogits(logits=block, step=lg["step"][first].astype(np.int32), token=lg["token"][first].astype(np.int64),
                        model=str(man.get("model", "captured")), source=f"moesim.capture run {man.get('run_id')}")


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _check(r: RouterLogits, k: int | None = None) -> tuple[int, int, int]:
    if r.logits.ndim != 3:
        raise ValueError(f"router logits must be [tokens, layers, experts], got shape {r.logits.shape}")
    n, n_l, e = r.logits.shape
    if k is not None and not 1 <= k <= e:
        raise ValueError(f"k={k} must be in 1..num_experts={e}")
    return n, n_l, e


def _build(r: RouterLogits, ids: np.ndarray, w: np.ndarray, keep: np.ndarray, *, num_experts: int, top_k: int,
           policy: str, variable: bool, extra: dict | None = None) -> Trace:
    """Trace from [N, L, K] ids/weights and a keep mask (rank = order among kept entries)."""
    n, n_l, kk = ids.shape
    rank = np.cumsum(keep, axis=2) - 1
    t_idx, l_idx, c_idx = np.nonzero(keep)
    cols = {"step": r.step[t_idx].astype(np.int32), "layer": l_idx.astype(np.int32),
            "token": r.token[t_idx].astype(np.int64), "rank": rank[t_idx, l_idx, c_idx].astype(np.int16),
            "expert": ids[t_idx, l_idx, c_idx].astype(np.int32), "weight": w[t_idx, l_idx, c_idx].astype(np.float32)}
    order = np.lexsort((cols["rank"], cols["token"], cols["layer"], cols["step"]))
    cols = {c: v[order] for c, v in cols.items()}
    meta = TraceMeta(model=r.model, num_experts=num_experts, top_k=max(top_k, 1), num_layers=n_l,
                     source=f"{r.source}; re-routed with workloads.routing_policies.{policy}",
                     extra={"routing_policy": policy, "variable_k": variable, **(extra or {})})
    trace = Trace(columns=cols, meta=meta)
    validate(trace)
    return trace


def _topk(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(p, ids, axis=-1)


def _routed_topk(r: RouterLogits, k: int, renormalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the softmax of ``r``'s logits, weights renormalised over the k when ``renormalize``."""
    ids, w = _topk(_softmax(r.logits.astype(np.float64)), k)
    if renormalize:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w


def topk(r: RouterLogits, *, k: int = 2, renormalize: bool = True) -> Trace:
    """Top-k of softmax(logits); weights renormalised to sum 1 per token (or raw probabilities)."""
    _check(r, k)
    ids, w = _routed_topk(r, k, renormalize)
    return _build(r, ids, w, np.ones(ids.shape, bool), num_experts=r.logits.shape[2], top_k=k, policy="topk",
                  variable=False, extra={"renormalize": renormalize})


def capacity(r: RouterLogits, *, k: int = 2, capacity_factor: float = 1.0, renormalize: bool = True) -> Trace:
    """Top-k with per-expert capacity per (step, layer); over-capacity choices are dropped (rank-major order)."""
    n, n_l, e = _check(r, k)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    ids, w = _routed_topk(r, k, renormalize)
    keep = np.zeros(ids.shape, bool)
    caps = {}
    for s in np.unique(r.step):
        toks = np.nonzero(r.step == s)[0]
        toks = toks[np.argsort(r.token[toks], kind="stable")]
        cap = int(np.ceil(capacity_factor * len(toks) * k / e))
        caps[int(s)] = cap
        for layer in range(n_l):
            # rank-major, token order: position of each choice in its expert's queue
            choice = ids[toks, layer, :].T.ravel()  # [k * tokens]
            onehot_pos = np.zeros(len(choice), dtype=np.int64)
            order = np.argsort(choice, kind="stable")
            sorted_e = choice[order]
            starts = np.searchsorted(sorted_e, sorted_e, side="left")
            onehot_pos[order] = np.arange(len(choice)) - starts
            ok = (onehot_pos < cap).reshape(k, len(toks)).T
            keep[toks, layer, :] = ok
    return _build(r, ids, w, keep, num_experts=e, top_k=k, policy="capacity", variable=True,
                  extra={"capacity_factor": capacity_factor, "capacity_per_step": caps,
                         "dropped_choices": int((~keep).sum())})


#: slack when comparing cumulative probability mass with p: float64 cumsum rounding must not keep an extra expert
_MASS_TOL = 1e-12


def top_p(r: RouterLogits, *, p: float = 0.5, max_k: int | None = None) -> Trace:
    """The fewest experts (by probability) whose mass reaches ``p``; at most ``max_k``. Weights = probabilities."""
    n, n_l, e = _check(r)
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    kmax = e if max_k is None else int(max_k)
    _check(r, kmax)
    prob = _softmax(r.logits.astype(np.float64))
    ids, w = _topk(prob, kmax)
    before = np.cumsum(w, axis=-1) - w  # mass of the experts ranked above
    keep = before < p - _MASS_TOL
    return _build(r, ids, w, keep, num_experts=e, top_k=kmax, policy="top_p", variable=True,
                  extra={"p": p, "max_k": kmax})


def null_experts(r: RouterLogits, *, k: int = 2, num_null: int = 2, null_logit: float = 0.0) -> Trace:
    """AdaMoE: top-k over E real + ``num_null`` null experts (logit ``null_logit``); null picks are dropped.
    Weights are the real experts' probabilities renormalised over the k picks (nulls included in the sum)."""
    n, n_l, e = _check(r)
    if num_null < 1 or not 1 <= k <= e + num_null:
        raise ValueError(f"null_experts: need num_null >= 1 and 1 <= k <= E + num_null, got k={k}, num_null={num_null}")
    ext = np.concatenate([r.logits.astype(np.float64), np.full((n, n_l, num_null), float(null_logit))], axis=-1)
    ids, w = _topk(_softmax(ext), k)
    w = w / w.sum(axis=-1, keepdims=True)
    keep = ids < e
    return _build(r, ids, w, keep, num_experts=e, top_k=k, policy="null_experts", variable=True,
                  extra={"num_null": num_null, "null_logit": null_logit})


def shared_experts(r: RouterLogits, *, k: int = 2, num_shared: int = 1, renormalize: bool = True) -> Trace:
    """Top-k routed experts (ranks 0..k-1) plus ``num_shared`` always-active experts E..E+s-1 (weight 1)."""
    n, n_l, e = _check(r, k)
    if num_shared < 1:
        raise ValueError(f"num_shared must be >= 1, got {num_shared}")
    ids, w = _routed_topk(r, k, renormalize)
    sid = np.broadcast_to(np.arange(e, e + num_shared), (n, n_l, num_shared))
    ids = np.concatenate([ids, sid], axis=-1)
    w = np.concatenate([w, np.ones((n, n_l, num_shared))], axis=-1)
    return _build(r, ids, w, np.ones(ids.shape, bool), num_experts=e + num_shared, top_k=k + num_shared,
                  policy="shared_experts", variable=False, extra={"num_shared": num_shared, "shared_expert_ids":
                                                                  list(range(e, e + num_shared))})


def expert_choice(r: RouterLogits, *, capacity_factor: float = 2.0) -> Trace:
    """Each expert picks its ``ceil(capacity_factor * tokens / E)`` top tokens per (step, layer)."""
    n, n_l, e = _check(r)
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    prob = _softmax(r.logits.astype(np.float64))
    chosen = np.zeros((n, n_l, e), bool)
    caps = {}
    for s in np.unique(r.step):
        toks = np.nonzero(r.step == s)[0]
        cap = min(len(toks), int(np.ceil(capacity_factor * len(toks) / e)))
        caps[int(s)] = cap
        for layer in range(n_l):
            sc = prob[toks, layer, :]  # [T, E]
            top_tok = np.argsort(-sc, axis=0, kind="stable")[:cap]  # [cap, E]
            chosen[toks[top_tok], layer, np.broadcast_to(np.arange(e), top_tok.shape)] = True
    ids = np.argsort(-np.where(chosen, prob, -1.0), axis=-1, kind="stable")  # chosen first, by probability
    keep = np.take_along_axis(chosen, ids, axis=-1)
    w = np.take_along_axis(prob, ids, axis=-1)
    return _build(r, ids, w, keep, num_experts=e, top_k=e, policy="expert_choice", variable=True,
                  extra={"capacity_factor": capacity_factor, "capacity_per_step": caps})


ROUTING_POLICIES: dict[str, Callable[..., Trace]] = {
    "topk": topk,
    "capacity": capacity,
    "top_p": top_p,
    "null_experts": null_experts,
    "shared_experts": shared_experts,
    "expert_choice": expert_choice,
}


def apply(name: str, r: RouterLogits, **options) -> Trace:
    """Run the policy ``name`` from ``ROUTING_POLICIES``."""
    if name not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; known: {sorted(ROUTING_POLICIES)}")
    return ROUTING_POLICIES[name](r, **options)


def synthetic_logits(num_tokens: int, num_layers: int, num_experts: int, *, seed: int = 0, num_steps: int = 1,
                     scale: float = 2.0) -> RouterLogits:
    """Gaussian router logits [N, L, E] (for tests and demos without a captured run)."""
    rng = np.random.default_rng(seed)
    n = num_tokens * num_steps
    g = np.arange(n)
    return RouterLogits(logits=(rng.standard_normal((n, num_layers, num_experts)) * scale).astype(np.float32),
                        step=(g // num_tokens).astype(np.int32), token=(g % num_tokens).astype(np.int64),
                        model="synthetic-logits", source=f"gaussian logits, seed {seed}")


__all__ = ["ROUTING_POLICIES", "RouterLogits", "apply", "from_capture", "synthetic_logits", *ROUTING_POLICIES]
