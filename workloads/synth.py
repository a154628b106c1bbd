"""Trace-fitted synthetic routing: fit a small generative model to a real trace, then generate traces of
any length, token count, expert count, layer count and top-k.

The model (:class:`SynthModel`) has three parts, all measured on the real trace:

1. per-layer expert load ``load`` ``[L, E]`` (share of selections, rows sum to 1);
2. inter-layer Markov affinity ``affinity`` ``[L-1, E, E]``: P(expert j at layer l+1 | expert i at layer l);
3. temporal locality ``locality`` ``[L]``: mean share of a token's experts also chosen by the previous token
   of the same sequence.

Generation (:func:`generate`) walks tokens of ``seq_len``-long sequences in order and layers in order. At
layer l a token's score for expert j is ``log c[l, j] + sum_{i in S(l-1)} log(P(j | i) / P(j)) + log b[l] *
[j in S_prev(l)] + Gumbel`` (S(l-1): the token's experts one layer up; S_prev(l): the previous token's
experts at layer l); its k largest scores are its experts in rank order (Gumbel top-k = sampling without
replacement). ``c`` (per-expert correction) and ``b`` (reuse boost) are calibrated by a short Monte-Carlo
fixed point so that the generated load and locality match the targets (sampling without replacement and
the affinity terms otherwise distort the marginals).

Other shapes: experts are mapped block-wise (E' > E: each fitted expert's load and affinity is split
evenly over E'/E new experts; E' < E: neighbouring experts are merged), layers by nearest fitted layer
(skipped layers compose their affinity matrices as a Markov chain; layers repeated from one fitted layer
reuse that layer's affinity lift to the next), locality keeps its lift over
random (locality / (k/E)), gate weights follow the fitted mean weight per rank (interpolated for k').

Group-limited routing (DeepSeek-V2/V3's ``n_group`` / ``topk_group``; :func:`generate`'s arguments of those names):
the experts are ``n_group`` groups of consecutive ids and each token takes its k experts from the ``topk_group``
groups with the highest best score (:func:`group_limited_top_k`); calibration runs with the same limit, so its
corrections make up for the loads the limit moves. :func:`check_group_limit` is the one check of such a limit
(the training step's balanced routing uses it too).

Baselines :func:`uniform_trace` and :func:`zipf_trace` (the usual assumptions of other simulators) are
named in ``BASELINES``; :func:`compare` measures any trace against a real one (load TVD, affinity TVD,
locality) so that the fitted generator can be checked against them on the same metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from workloads import stats
from workloads.trace import Trace, TraceMeta, from_dense


@dataclass(frozen=True)
class SynthModel:
    """Fitted routing statistics.

    ``load`` [L, E] share of selections per expert (rows sum to 1); ``affinity`` [L-1, E, E] row-stochastic
    P(j at l+1 | i at l); ``locality`` [L] target overlap share with the previous token (0..1);
    ``weight_profile`` [L, k] mean gate weight per rank; ``seq_len`` tokens per sequence.
    """

    num_experts: int
    top_k: int
    num_layers: int
    load: np.ndarray
    affinity: np.ndarray
    locality: np.ndarray
    weight_profile: np.ndarray
    seq_len: int
    source: str
    extra: dict = field(default_factory=dict)


def fit(trace: Trace, *, smoothing: float | None = None) -> SynthModel:
    """Fit a :class:`SynthModel` to ``trace``. ``smoothing``: pseudo-pairs per affinity row (default 4 E),
    shrinking rows seen rarely toward the next layer's load (reduces over-fitting on short traces)."""
    m = trace.meta
    if m.extra.get("variable_k"):
        raise ValueError("fit: variable-k traces are not supported (the generator draws a fixed top-k)")
    sm = float(4 * m.num_experts if smoothing is None else smoothing)
    if sm < 0:
        raise ValueError(f"fit: smoothing must be >= 0, got {smoothing}")
    load = stats.load_fraction(trace)
    aff = stats.affinity_matrices(trace, smoothing=sm)
    loc = stats.temporal_locality(trace)
    wsum = np.zeros((m.num_layers, m.top_k))
    wcnt = np.zeros((m.num_layers, m.top_k))
    np.add.at(wsum, (trace.columns["layer"], trace.columns["rank"]), trace.columns["weight"].astype(np.float64))
    np.add.at(wcnt, (trace.columns["layer"], trace.columns["rank"]), 1.0)
    wprof = np.divide(wsum, wcnt, out=np.full_like(wsum, 1.0 / m.top_k), where=wcnt > 0)
    seq_len = int(m.extra.get("seq_len") or 0)
    if not seq_len and "position" in trace.columns:
        seq_len = int(trace.columns["position"].max()) + 1
    if not seq_len:
        seq_len = max(trace.tokens_per_step().values())
    return SynthModel(num_experts=m.num_experts, top_k=m.top_k, num_layers=m.num_layers, load=load, affinity=aff,
                      locality=loc, weight_profile=wprof, seq_len=seq_len,
                      source=f"synthetic, fitted to {m.model} ({m.source})", extra={"fitted_model": m.model,
                                                                                   "smoothing": sm})


def fit_counts(load_counts: np.ndarray, pair_counts: np.ndarray | None, top_k: int, *, source: str,
               locality: np.ndarray | None = None, seq_len: int = 2048, model: str = "counts") -> SynthModel:
    """Fit from aggregate statistics: ``load_counts`` [L, E] selections, ``pair_counts`` [L-1, E, E] co-selection
    counts of consecutive recorded layers (None = independent layers), ``locality`` [L] (None = random)."""
    load_counts = np.asarray(load_counts, dtype=np.float64)
    if load_counts.ndim != 2 or (load_counts < 0).any():
        raise ValueError(f"fit_counts: load_counts must be a non-negative [layers, experts] array, got {load_counts.shape}")
    n_l, n_e = load_counts.shape
    load = load_counts / load_counts.sum(axis=1, keepdims=True)
    aff = np.zeros((max(n_l - 1, 0), n_e, n_e))
    for layer in range(n_l - 1):
        if pair_counts is None:
            aff[layer] = load[layer + 1][None, :]
            continue
        c = np.asarray(pair_counts[layer], dtype=np.float64)
        rows = c.sum(axis=1, keepdims=True)
        aff[layer] = np.where(rows > 0, c / np.where(rows > 0, rows, 1), load[layer + 1][None, :])
    loc = np.full(n_l, top_k / n_e) if locality is None else np.asarray(locality, dtype=np.float64)
    return SynthModel(num_experts=n_e, top_k=top_k, num_layers=n_l, load=load, affinity=aff, locality=loc,
                      weight_profile=np.full((n_l, top_k), 1.0 / top_k), seq_len=seq_len, source=source,
                      extra={"fitted_model": model})


# ---------------------------------------------------------------- reshaping to other shapes

def _expert_map(e_from: int, e_to: int) -> np.ndarray:
    """Mass-spreading matrix [e_from, e_to]: rows sum to 1 (split when growing, merge when shrinking)."""
    m = np.zeros((e_from, e_to))
    if e_to >= e_from:
        src = (np.arange(e_to) * e_from) // e_to
        cnt = np.bincount(src, minlength=e_from)
        m[src, np.arange(e_to)] = 1.0 / cnt[src]
    else:
        m[np.arange(e_from), (np.arange(e_from) * e_to) // e_from] = 1.0
    return m


def _reshape(model: SynthModel, e: int, k: int, n_l: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Targets for the new shape: load [n_l, e], affinity PMI log P(j|i)/P(j) [n_l-1, e, e], locality [n_l],
    weights [n_l, k]."""
    src_l = np.zeros(n_l, dtype=int) if n_l == 1 else np.rint(np.arange(n_l) * (model.num_layers - 1) / (n_l - 1)).astype(int)
    emap = _expert_map(model.num_experts, e)
    load = model.load[src_l] @ emap
    trans = np.zeros((max(n_l - 1, 0), e, e))
    for lp in range(n_l - 1):
        a, b = src_l[lp], src_l[lp + 1]
        if model.num_layers == 1:
            t = np.broadcast_to(model.load[0][None, :], (model.num_experts,) * 2)
        elif b > a:
            t = np.eye(model.num_experts)
            for mid in range(a, b):
                t = t @ model.affinity[mid]
        else:
            t = model.affinity[min(a, model.num_layers - 2)]
        joint = emap.T @ (model.load[a][:, None] * t) @ emap
        rows = joint.sum(axis=1, keepdims=True)
        col = joint.sum(axis=0)
        col = col / col.sum()
        p = np.where(rows > 0, joint / np.where(rows > 0, rows, 1), col[None, :])
        # pointwise mutual information log P(j | i) / P(j) of the pair the transition came from (a lift, so it
        # can be reused between layers of other loads; calibration matches the loads). The sampler adds it up
        # over the token's k experts at the previous layer (a product of experts; a plain mixture of the k
        # rows would dilute the affinity k-fold).
        trans[lp] = np.log(np.clip(p, _PROB_FLOOR, None) / np.clip(col[None, :], _PROB_FLOOR, None))
    lift = model.locality[src_l] / (model.top_k / model.num_experts)
    loc = np.clip(lift * k / e, 0.0, 1.0)
    xs = np.linspace(0, 1, model.top_k) if model.top_k > 1 else np.zeros(1)
    xt = np.linspace(0, 1, k) if k > 1 else np.zeros(1)
    wprof = np.stack([np.interp(xt, xs, model.weight_profile[s]) for s in src_l])
    return load, trans, loc, wprof


# ---------------------------------------------------------------- group-limited routing

def check_group_limit(num_experts: int, top_k: int, n_group: int, topk_group: int) -> int:
    """Size of each expert group of DeepSeek-style group-limited routing (``n_group`` groups of consecutive expert
    ids, each token's experts in at most ``topk_group`` of them); ValueError naming the fields when ``n_group`` does
    not divide the experts, ``topk_group`` is outside 1..n_group or ``topk_group`` groups hold fewer than top-k
    experts. The one place the training step's balanced and synthetic routings check the limit."""
    if n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group {n_group} must divide the {num_experts} experts and be >= topk_group "
                         f"{topk_group} >= 1")
    size = num_experts // n_group
    if topk_group * size < top_k:
        raise ValueError(f"top-{top_k} over at most topk_group {topk_group} groups of {size} experts: fewer than "
                         f"{top_k} distinct experts")
    return size


def expert_groups(experts: np.ndarray, num_experts: int, n_group: int) -> np.ndarray:
    """Group of each expert id (``n_group`` groups of consecutive ids), same shape as ``experts``."""
    return np.asarray(experts) // (num_experts // n_group)


def groups_spanned(experts: np.ndarray, num_experts: int, n_group: int) -> np.ndarray:
    """[tokens] how many distinct groups each token's experts (``experts`` [tokens, k]) lie in."""
    g = np.sort(expert_groups(experts, num_experts, n_group), axis=1)
    return 1 + (np.diff(g, axis=1) != 0).sum(axis=1)


def group_limited_top_k(score: np.ndarray, k: int, n_group: int = 1, topk_group: int = 1) -> np.ndarray:
    """[tokens, k] indices of the k highest ``score`` [tokens, experts] in rank order, among the ``topk_group``
    groups whose best score is highest (DeepSeek-V2's ``group_limited_greedy`` gate: group score = its highest
    expert score). On Gumbel-perturbed log-weights the group maxima are Gumbel with the groups' log total weight,
    so the groups are drawn without replacement in proportion to their weight. ``n_group`` 1 (or ``topk_group`` =
    ``n_group``): plain top-k."""
    if n_group > 1 and topk_group < n_group:
        n, e = score.shape
        masked = score.reshape(n, n_group, e // n_group).copy()  # [tokens, groups, experts of a group]
        drop = np.argpartition(-masked.max(axis=2), topk_group - 1, axis=1)[:, topk_group:]  # groups outside the limit
        masked[np.arange(n)[:, None], drop] = -np.inf
        score = masked.reshape(n, e)
    part = np.argpartition(-score, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(score, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


# ---------------------------------------------------------------- sampling engine

_GUMBEL_EPS = np.float32(1e-12)  # keeps log(0) out of the Gumbel noise when the RNG draws exactly 0


def _run(logc: np.ndarray, logb: np.ndarray, trans: np.ndarray, k: int, n_seq: int, seq_len: int,
         rng: np.random.Generator, groups: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Sample experts [n_seq * seq_len, L, k] (rank order); tokens ordered sequence-major; ``groups``:
    (n_group, topk_group) of group-limited routing (:func:`group_limited_top_k`)."""
    n_l, e = logc.shape
    logc = logc.astype(np.float32)
    trans = trans.astype(np.float32)
    out = np.zeros((n_seq, seq_len, n_l, k), dtype=np.int32)
    rows = np.arange(n_seq)[:, None]
    for p in range(seq_len):
        prev_sel = None
        for layer in range(n_l):
            score = np.broadcast_to(logc[layer], (n_seq, e)).copy()
            if layer > 0:  # sum of the PMI rows of the token's experts one layer up
                tl = trans[layer - 1]
                for j in range(prev_sel.shape[1]):
                    score += tl[prev_sel[:, j]]
            if p > 0 and logb[layer] != 0:
                score[rows, out[:, p - 1, layer]] += logb[layer]
            score -= np.log(-np.log(rng.random((n_seq, e), dtype=np.float32) + _GUMBEL_EPS))  # Gumbel
            sel = group_limited_top_k(score, k, *groups)
            out[:, p, layer] = sel
            prev_sel = sel
    return out.reshape(n_seq * seq_len, n_l, k)


def _measure(ids: np.ndarray, e: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Load share [L, E] and locality [L] of dense ids [tokens, L, k] laid out as sequences of seq_len."""
    n_t, n_l, k = ids.shape
    load = np.zeros((n_l, e))
    for layer in range(n_l):
        load[layer] = np.bincount(ids[:, layer].ravel(), minlength=e)
    load /= load.sum(axis=1, keepdims=True)
    seq = ids.reshape(-1, seq_len, n_l, k)
    if seq_len < 2:
        return load, np.zeros(n_l)
    eq = (seq[:, 1:, :, :, None] == seq[:, :-1, :, None, :]).any(axis=-1)
    return load, eq.mean(axis=(0, 1, 3))


# constants of the fixed-point calibration (:func:`calibrate`), each with its reason
_PROB_FLOOR = 1e-9  # floor of a load share / probability before log(): an unused expert stays finite
_LOCALITY_FLOOR = 1e-6  # floor of a reuse rate before log(): a layer with no reuse stays finite
_REFINE_ITERATIONS = 4  # the last iterations use twice the tokens and half the step: less sampling noise
_STEP, _REFINE_STEP = 0.8, 0.4  # damped fixed-point steps in log space (1.0 overshoots on skewed loads)
_BOOST_GAIN = 1.5  # the reuse boost responds sub-linearly to log-locality, so it takes a larger step
_MAX_BOOST_LIFT = 50.0  # a reuse boost starts at most at 50x the uniform reuse rate
_MAX_LOG_BOOST = 20.0  # and never exceeds e^20: one expert would then take every repeat
_MIN_LOG_CORRECTION = -40.0  # an expert's log-correction floor: e^-40 ~ never chosen, yet finite


@dataclass
class _Calibrated:
    logc: np.ndarray
    logb: np.ndarray
    trans: np.ndarray
    wprof: np.ndarray
    k: int
    groups: tuple[int, int] = (1, 1)  # (n_group, topk_group) it was calibrated for


def calibrate(model: SynthModel, num_experts: int, top_k: int, num_layers: int, *, seed: int = 0,
              iterations: int = 10, tokens: int = 4096, n_group: int = 1, topk_group: int = 1) -> _Calibrated:
    """Fixed-point calibration of per-expert corrections and reuse boosts for one target shape (and group limit:
    the corrections then make up for the loads the limit moves)."""
    check_group_limit(num_experts, top_k, n_group, topk_group)
    load, trans, loc, wprof = _reshape(model, num_experts, top_k, num_layers)
    rng = np.random.default_rng(seed)
    target = np.clip(load, _PROB_FLOOR, None)
    logc = np.log(target)
    base = top_k / num_experts
    logb = np.log(np.clip(loc / base, 1.0, _MAX_BOOST_LIFT))
    seq_len = max(2, min(model.seq_len, 16))  # short sequences: fewer Python steps, same statistics
    for it in range(iterations):
        refine = it >= iterations - _REFINE_ITERATIONS
        n_tok = tokens * 2 if refine else tokens
        n_seq = max(1, n_tok // seq_len)
        ids = _run(logc, logb, trans, top_k, n_seq, seq_len, rng, (n_group, topk_group))
        got_load, got_loc = _measure(ids, num_experts, seq_len)
        step = _REFINE_STEP if refine else _STEP
        logc += step * (np.log(target) - np.log(np.clip(got_load, _PROB_FLOOR, None)))
        logc -= logc.max(axis=1, keepdims=True)
        logc = np.maximum(logc, _MIN_LOG_CORRECTION)
        log_loc_error = np.log(np.clip(loc, _LOCALITY_FLOOR, None)) - np.log(np.clip(got_loc, _LOCALITY_FLOOR, None))
        logb = np.clip(logb + _BOOST_GAIN * step * log_loc_error, 0.0, _MAX_LOG_BOOST)
        logb = np.where(loc <= base, 0.0, logb)
    return _Calibrated(logc=logc, logb=logb, trans=trans, wprof=wprof, k=top_k, groups=(n_group, topk_group))


def generate(model: SynthModel, num_tokens: int, *, num_experts: int | None = None, top_k: int | None = None,
             num_layers: int | None = None, num_steps: int = 1, seq_len: int | None = None, seed: int = 0,
             model_name: str | None = None, calibration: _Calibrated | None = None, n_group: int = 1,
             topk_group: int = 1) -> Trace:
    """Generate a trace of ``num_steps`` steps with ``num_tokens`` tokens each (default shape = fitted shape).

    Tokens of a step form sequences of ``seq_len`` (default the fitted one); the trace has ``sequence`` and
    ``position`` columns and ``weight`` = fitted mean gate weight of each rank. ``n_group`` / ``topk_group``:
    DeepSeek-style group-limited routing, each token's experts in at most ``topk_group`` of ``n_group`` groups of
    consecutive expert ids (:func:`group_limited_top_k`; 1 and 1: no limit).
    """
    e = model.num_experts if num_experts is None else int(num_experts)
    k = model.top_k if top_k is None else int(top_k)
    n_l = model.num_layers if num_layers is None else int(num_layers)
    for name, v in (("num_tokens", num_tokens), ("num_experts", e), ("top_k", k), ("num_layers", n_l),
                    ("num_steps", num_steps)):
        if int(v) < 1:
            raise ValueError(f"generate: {name} must be >= 1, got {v}")
    if k > e:
        raise ValueError(f"generate: top_k={k} exceeds num_experts={e}")
    seq_len = int(seq_len or model.seq_len)
    if seq_len < 1:
        raise ValueError(f"generate: seq_len must be >= 1, got {seq_len}")
    check_group_limit(e, k, n_group, topk_group)
    cal = calibration or calibrate(model, e, k, n_l, seed=seed + 1, n_group=n_group, topk_group=topk_group)
    if cal.groups != (n_group, topk_group):
        raise ValueError(f"generate: the calibration is for (n_group, topk_group) {cal.groups}, not "
                         f"{(n_group, topk_group)}")
    rng = np.random.default_rng(seed)
    total = num_tokens * num_steps
    n_seq = -(-total // seq_len)
    ids = _run(cal.logc, cal.logb, cal.trans, k, n_seq, seq_len, rng, (n_group, topk_group))[:total]
    weights = np.broadcast_to(cal.wprof[None, :, :], ids.shape).astype(np.float32)
    g = np.arange(total)
    meta = TraceMeta(model=model_name or f"synth-{model.extra.get('fitted_model', 'fit')}", num_experts=e, top_k=k,
                     num_layers=n_l, source=model.source,
                     extra={"generator": "workloads.synth.generate", "seed": seed, "seq_len": seq_len,
                            **({"n_group": n_group, "topk_group": topk_group} if n_group > 1 else {})})
    return from_dense(ids, weights, meta, step=(g // num_tokens).astype(np.int32), token=g % num_tokens,
                      extra={"sequence": (g // seq_len).astype(np.int32), "position": (g % seq_len).astype(np.int32)})


# ---------------------------------------------------------------- baselines

def _baseline(probs: np.ndarray, num_tokens: int, k: int, seed: int, name: str, seq_len: int) -> Trace:
    n_l, e = probs.shape
    rng = np.random.default_rng(seed)
    ids = np.zeros((num_tokens, n_l, k), dtype=np.int32)
    for layer in range(n_l):
        score = np.log(probs[layer])[None, :] + rng.gumbel(size=(num_tokens, e))
        part = np.argpartition(-score, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(score, part, axis=1), axis=1)
        ids[:, layer] = np.take_along_axis(part, order, axis=1)
    g = np.arange(num_tokens)
    meta = TraceMeta(model=f"{name}-baseline", num_experts=e, top_k=k, num_layers=n_l,
                     source=f"synthetic {name} baseline (workloads.synth)", extra={"seq_len": seq_len, "seed": seed})
    return from_dense(ids, np.full(ids.shape, 1.0 / k, dtype=np.float32), meta,
                      extra={"sequence": (g // seq_len).astype(np.int32), "position": (g % seq_len).astype(np.int32)})


def uniform_trace(num_tokens: int, num_experts: int, top_k: int, num_layers: int, *, seed: int = 0,
                  seq_len: int = 64) -> Trace:
    """Every token picks ``top_k`` distinct experts uniformly at random, independently per layer."""
    return _baseline(np.full((num_layers, num_experts), 1.0 / num_experts), num_tokens, top_k, seed, "uniform", seq_len)


def zipf_trace(num_tokens: int, num_experts: int, top_k: int, num_layers: int, *, seed: int = 0,
               exponent: float = 1.0, seq_len: int = 64) -> Trace:
    """Zipf-skewed choice: expert popularity ~ 1/rank**exponent, a random ranking per layer, no affinity."""
    rng = np.random.default_rng(seed + 7919)
    p = 1.0 / np.arange(1, num_experts + 1) ** exponent
    probs = np.stack([rng.permutation(p / p.sum()) for _ in range(num_layers)])
    return _baseline(probs, num_tokens, top_k, seed, "zipf", seq_len)


BASELINES: dict[str, Callable[..., Trace]] = {"uniform": uniform_trace, "zipf": zipf_trace}


# ---------------------------------------------------------------- validation

def compare(candidate: Trace, real: Trace) -> dict:
    """Distances of ``candidate`` from ``real`` (same E and L): per-layer load TVD ``[L]``, per-pair joint
    affinity TVD ``[L-1]`` (TVD of the (i at l, j at l+1) pair distributions) and locality difference ``[L]``."""
    a, b = candidate.meta, real.meta
    if (a.num_experts, a.num_layers) != (b.num_experts, b.num_layers):
        raise ValueError(f"compare: shapes differ: candidate {a.num_layers}x{a.num_experts}, "
                         f"real {b.num_layers}x{b.num_experts} (layers x experts)")
    la, lb = stats.expert_load(candidate), stats.expert_load(real)
    load_tvd = np.array([stats.tvd(la[i], lb[i]) for i in range(a.num_layers)])
    aff_tvd = np.array([stats.tvd(stats.pair_counts(candidate, i), stats.pair_counts(real, i))
                        for i in range(a.num_layers - 1)])
    loc_diff = stats.temporal_locality(candidate) - stats.temporal_locality(real)
    return {"load_tvd": load_tvd, "affinity_tvd": aff_tvd, "locality_diff": loc_diff}


# ---------------------------------------------------------------- OLMoE-paper aggregate statistics

OLMOE_STATS_DIR = "olmoe-paper-routing-stats"


def load_olmoe_stats(traces_dir: str | Path, model: str, domain: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Read the OLMoE-paper routing statistics (see shared/data/traces/README.md, Apache-2.0, allenai/OLMoE
    357454f): load counts [3, E] for recorded layers 0/7/15, rank-zipped pair counts [2, E, E] (0->7, 7->15)
    and top_k. ``model`` is a prefix of the CSV's model name (``Mixtral`` or ``OLMoE``)."""
    import pandas as pd

    base = Path(traces_dir) / OLMOE_STATS_DIR
    ld = pd.read_csv(base / "expert_load_per_layer.csv")
    ld = ld[ld["model"].str.startswith(model) & (ld["domain"] == domain)]
    if ld.empty:
        raise ValueError(f"no OLMoE-paper load rows for model {model!r}, domain {domain!r} in {base}")
    layers = sorted(ld["layer"].unique())
    e = int(ld["expert"].max()) + 1
    load = np.zeros((len(layers), e))
    for i, layer in enumerate(layers):
        part = ld[ld["layer"] == layer]
        load[i, part["expert"].to_numpy()] = part["selections"].to_numpy()
    pr = pd.read_csv(base / "crosslayer_expert_pairs.csv")
    pr = pr[pr["model"].str.startswith(model) & (pr["domain"] == domain)]
    pairs = np.zeros((len(layers) - 1, e, e))
    for i in range(len(layers) - 1):
        part = pr[(pr["layer_a"] == layers[i]) & (pr["layer_b"] == layers[i + 1])]
        np.add.at(pairs[i], (part["expert_a"].to_numpy(), part["expert_b"].to_numpy()), part["count"].to_numpy())
    return load, pairs, int(ld["top_k"].iloc[0])
