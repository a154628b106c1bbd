"""Expert parallelism for inference: the standard two all-to-alls per MoE layer, and ExFlow's context-coherent mode
(one all-to-all per layer), as one model.

ExFlow: J. Yao, Q. Anthony, A. Shafi, H. Subramoni, D. K. Panda, "Exploiting Inter-Layer Expert Affinity for
Accelerating Mixture-of-Experts Model Inference", IPDPS 2024 (arXiv:2401.08383). Its claims: one all-to-all
per layer instead of two, up to 67 % less cross-GPU routing latency with an affinity-aware placement (integer
program over the inter-layer affinity), up to 2.2x inference throughput over DeepSpeed-MoE.

Both modes are the training engine's MoE phases (:func:`moesim.train.moe.moe_times`): the same routing window of
the trace, the same expert placement, the same copies per token (its de-duplicated dispatch,
:func:`moesim.train.moe.step_options`), the same payload bytes and the same all-to-all model (the cost model's,
:func:`hwmodels.cost.collective_model`: the NCCL-fitted one for the default GPU cost). ``standard`` is exactly
those phases (:func:`ep_moe_times` returns them unchanged). ``coherent`` changes only where a token's hidden state
is before and after each MoE layer (:func:`layer_copies`):

- ``standard``: a token lives on its home device ``h`` (the contiguous shard of its index in the routing window,
  as :func:`moesim.sim.aggregate` assigns it); layer j: dispatch from ``h`` to each chosen expert's device, combine
  of the expert outputs back to ``h`` (two all-to-alls);
- ``coherent``: the token stays where its (highest-weight, primary) expert ran and the next layer's attention
  runs there: layer j's dispatch starts from where layer j - 1 left it (``h`` for the first MoE layer); its
  outputs are summed on the primary expert's device (top-1: all local, no second all-to-all: one all-to-all per
  layer exactly as ExFlow; top-k > 1: the other experts' partial outputs move there, one copy per (token, device)
  as the de-duplicated combine sends them); after the model's last MoE layer the outputs go home (the standard
  combine), for the LM head and the next iteration. Attention anywhere needs the request's KV anywhere: the
  context is kept coherent by holding every request's KV on every device of the group (our modelling
  assumption: KV memory x group size, and an all-gather of the iteration's new KV per layer, :class:`EPMode`).

Model MoE layer j uses trace layer j mod (trace layers); its source is where model layer j - 1 left the token.
Device-local copies (the diagonal) cross no link.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from moesim.placement import Placement

MODES = ("standard", "coherent")


@dataclass(frozen=True)
class EPMode:
    """How tokens move between the experts' devices: ``mode`` (:data:`MODES`); coherent mode all-gathers the new
    tokens' KV (``kv_bytes_per_token_layer`` bytes per token and layer) to every device of the group once per layer
    when ``replicate_kv`` (every device holds every request's KV); ``replicate_kv`` False: context coherence for
    free (no KV copies, no all-gather: the bound of the mode's gain)."""

    mode: str = "standard"
    kv_bytes_per_token_layer: float = 0.0
    replicate_kv: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"--ep-mode must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def coherent(self) -> bool:
        return self.mode == "coherent"


def expert_device(placement: Placement) -> np.ndarray:
    """[layers, experts] device of each expert (a placement without replicas)."""
    out = np.full((placement.num_layers, placement.num_experts), -1, dtype=np.int64)
    for layer in range(placement.num_layers):
        slots = np.flatnonzero(placement.slot_to_expert[layer] >= 0)
        experts = placement.slot_to_expert[layer, slots]
        if len(np.unique(experts)) != len(experts):
            raise ValueError("context-coherent EP needs one copy of each expert (a placement without replicas)")
        out[layer, experts] = slots // placement.slots_per_device
    if (out < 0).any():
        raise ValueError("the placement leaves some experts unplaced")
    return out


def top1(trace):
    """``trace`` keeping only each token's highest-weight choice per layer (ties: the first row); top_k 1."""
    from workloads.trace import Trace

    c = trace.columns
    tok = c["step"].astype(np.int64) * (int(c["token"].max()) + 1) + c["token"].astype(np.int64)
    keep = np.sort(_primary(c["layer"], tok, c["weight"]))
    cols = {k: v[keep] for k, v in c.items()}
    cols["rank"] = np.zeros(len(keep), dtype=c["rank"].dtype)
    return Trace(columns=cols, meta=dataclasses.replace(trace.meta, top_k=1))


def _primary(layer: np.ndarray, tok: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Row of each (layer, token)'s primary choice: its highest weight (ties: the first row); by layer, then token."""
    order = np.lexsort((-weight, tok, layer))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (layer[order][1:] != layer[order][:-1]) | (tok[order][1:] != tok[order][:-1])
    return order[first]


def _copies(tok: np.ndarray, src: np.ndarray, dst: np.ndarray, d: int, dedup: str, per_node: int) -> np.ndarray:
    """[D, D] copies one all-to-all sends for the (token, destination device) rows of one layer: one per row
    (``none``), or de-duplicated as :func:`moesim.sim.dedup_pair_keys` sends them."""
    from moesim.sim import dedup_pair_keys

    if dedup == "none":
        key = src.astype(np.int64) * d + dst
    else:
        key = dedup_pair_keys(np.zeros(len(tok), dtype=np.int64), tok, src, dst, d, dedup, per_node)
    return np.bincount(key, minlength=d * d).reshape(d, d)


def layer_copies(part, placement: Placement, num_devices: int, mode: str, dedup: str, devices_per_node: int,
                 moe_layers: int) -> dict[str, np.ndarray]:
    """Copies sent per (sender, receiver) device in each of the model's ``moe_layers`` MoE layers for the tokens of
    ``part`` (one step, tokens 0..n-1, every token in every layer: a routing window of
    :func:`moesim.train.moe.sample_steps`): ``dispatch`` and ``combine`` [moe_layers, D, D] (see the module
    docstring). ``standard`` gives the training engine's (:func:`moesim.sim.aggregate`'s) pair counts per layer."""
    if mode not in MODES:
        raise ValueError(f"EP mode must be one of {', '.join(MODES)}, got {mode!r}")
    c, d = part.columns, num_devices
    if np.unique(c["step"]).size != 1:
        raise ValueError("layer_copies takes one step of routing")
    dev = expert_device(placement)
    used = dev.shape[0]
    n = int(c["token"].max()) + 1
    home = (np.arange(n, dtype=np.int64) * d) // n  # the contiguous shard of moesim.sim.aggregate
    layer, tok = c["layer"].astype(np.int64), c["token"].astype(np.int64)
    dst = dev[layer, c["expert"].astype(np.int64)]
    rows = [np.flatnonzero(layer == t) for t in range(used)]
    primary = np.tile(home, (used, 1))  # the primary choice's device (:func:`_primary`)
    firsts = _primary(layer, tok, c["weight"])
    primary[layer[firsts], tok[firsts]] = dst[firsts]
    memo: dict = {}

    def where(j: int):  # (key, device [n]) of the tokens after model MoE layer j
        if j < 0 or j == moe_layers - 1 or mode == "standard":
            return "home", home
        return j % used, primary[j % used]

    out = {k: np.zeros((moe_layers, d, d), dtype=np.int64) for k in ("dispatch", "combine")}
    for j in range(moe_layers):
        t, r = j % used, rows[j % used]
        (ks, src), (kd, sink) = where(j - 1), where(j)
        for name, key, at in (("dispatch", ks, src), ("combine", kd, sink)):
            if (t, name, key) not in memo:
                m = _copies(tok[r], at[tok[r]], dst[r], d, dedup, devices_per_node)
                memo[(t, name, key)] = m if name == "dispatch" else m.T
            out[name][j] = memo[(t, name, key)]
    return out


def ep_moe_times(cfg, system, spec, cost, trace, placement: Placement | None, ep_mode: EPMode | None):
    """The MoE phases (:class:`moesim.train.moe.MoETimes`) of ``cfg`` replaying ``trace`` on ``placement`` in
    ``ep_mode`` (None: standard): the training engine's :func:`moesim.train.moe.moe_times`, with, in coherent mode,
    the dispatch and combine of :func:`layer_copies` on the same routing window (one sample) timed by the same
    all-to-all model, plus the KV all-gather per layer (:class:`EPMode`)."""
    from moesim.train.moe import moe_times

    mt = moe_times(cfg, system, spec, cost, trace, placement=placement)
    if ep_mode is None or not ep_mode.coherent:
        return mt
    if trace is None:
        raise ValueError("--ep-mode coherent needs routing from a trace (--trace or --request-routing)")
    return _coherent(mt, cfg, system, spec, cost, trace, mt.placement, ep_mode)


def _coherent(mt, cfg, system, spec, cost, trace, placement: Placement, ep_mode: EPMode):
    from hwmodels.cost import collective_model
    from hwmodels.topology import all_to_all_routing
    from moesim.sim import activation_bytes
    from moesim.train.collectives import group_system
    from moesim.train.moe import sample_steps, step_options

    if spec.routing_samples != 1:
        raise ValueError("context-coherent expert parallelism replays one routing sample")
    ep, etp = spec.parallel.ep, spec.parallel.etp
    n_moe = len(cfg.moe_layers)
    parts, scale = sample_steps(trace, ep, mt.tokens_per_device, 1, placement.num_layers)
    ep_system = group_system(system, ep, etp)  # as moesim.train.moe.moe_times spans the EP group
    options = step_options(spec)
    copies = layer_copies(parts[0], placement, ep, "coherent", options.dispatch_dedup, ep_system.devices_per_node,
                          n_moe)
    act = activation_bytes(cfg.to_moe_model(), options)
    a2a, model = all_to_all_routing(ep_system), collective_model(cost, ep_system)
    # counts scaled as moesim.train.moe scales a window, in each all-to-all's payload bytes
    sent = {k: np.rint(copies[k] * scale) * b for k, b in (("dispatch", act.dispatch_bytes),
                                                           ("combine", act.combine_bytes))}
    memo: dict = {}
    dispatch_s, combine_s = (np.array([_memo_duration(memo, model, a2a, m) for m in sent[k]])
                             for k in ("dispatch", "combine"))
    if ep_mode.replicate_kv and ep_mode.kv_bytes_per_token_layer > 0 and ep > 1:
        m = np.full((ep, ep), mt.tokens_per_device * ep_mode.kv_bytes_per_token_layer)
        np.fill_diagonal(m, 0.0)
        combine_s = combine_s + model.duration_s(a2a, m)
    etp_in = mt.etp_gather_s if mt.etp_gather_s is not None else 0.0  # expert TP stays as it is
    etp_out = mt.etp_scatter_s if mt.etp_scatter_s is not None else 0.0
    d = sent["dispatch"]
    return dataclasses.replace(mt, dispatch_s=dispatch_s[None] + etp_in, combine_s=combine_s[None] + etp_out,
                               dispatch_sent_bytes=(d.sum(axis=2) - np.einsum("lii->li", d)).max(axis=1)[None])


def _memo_duration(memo: dict, model, a2a, pair_bytes: np.ndarray) -> float:
    key = pair_bytes.tobytes()
    if key not in memo:
        memo[key] = float(model.duration_s(a2a, pair_bytes))
    return memo[key]


def split_by_sequence(trace, fit_fraction: float = 0.5):
    """(fit, held-out) traces: the first ``fit_fraction`` of each step's sequences and the rest (placements are
    fitted on one part and judged on the other), tokens renumbered 0..n-1 per step (the engines shard a step's
    tokens over devices by index: a part with ids 1024..2047 would sit on half of them)."""
    from workloads.trace import Trace

    c = trace.columns
    seq = c["sequence"] if "sequence" in c else c["token"]
    cut = np.quantile(np.unique(seq), fit_fraction)
    fit = seq <= cut
    if fit.all() or not fit.any():
        raise ValueError("the trace has too few sequences to split into a fitting and a held-out part")
    return tuple(Trace(columns={k: v[m] for k, v in c.items()}, meta=trace.meta).renumber_tokens() for m in (fit, ~fit))


def place(trace, method: str, num_devices: int, devices_per_node: int, seed: int = 0,
          time_limit_s: float = 10.0, num_replicas: int = 0) -> Placement:
    """The placement of ``method`` (a name of :data:`moesim.place.METHODS`) fitted on ``trace``, with
    ``num_replicas`` redundant expert slots (EPLB-style replicas; methods without replicas refuse them); CP-SAT
    runs deterministic on one worker."""
    from moesim.place import get_method, problem_from_trace

    m = get_method(method)
    problem = problem_from_trace(trace, num_devices, devices_per_node, with_affinity=m.needs_affinity,
                                 num_replicas=num_replicas)
    if m.placer is not None:
        return m.placer(problem, np.random.default_rng(seed))
    placement, _ = m.place(problem, np.random.default_rng(seed), time_limit_s=time_limit_s, deterministic=True,
                           num_workers=1, seed=seed)
    return placement
