"""Expert-parallel token movement for inference: the standard two all-to-alls per MoE layer against ExFlow's
context-coherent mode (one all-to-all per layer), on a routing trace and an expert placement.

ExFlow: J. Yao, Q. Anthony, A. Shafi, H. Subramoni, D. K. Panda, "Exploiting Inter-Layer Expert Affinity for
Accelerating Mixture-of-Experts Model Inference", IPDPS 2024 (arXiv:2401.08383). Its claims: one all-to-all
per layer instead of two, up to 67 % less cross-GPU routing latency with an affinity-aware placement (integer
program over the inter-layer affinity), up to 2.2x inference throughput over DeepSpeed-MoE.

The model here (token counts per (source, destination) device pair and MoE layer, per token of the trace):

- ``standard``: a token lives on its home device ``h`` (its sequence's data-parallel rank, sequence mod devices;
  the token index when the trace has no sequences). Layer l: ``dispatch`` h -> device of each chosen expert,
  ``combine`` back (the transpose).
- ``coherent``: the token's hidden state stays where its expert ran. Layer l: ``dispatch`` from its position
  ``p(l-1)`` (``p(-1) = h``) to each chosen expert; with top-k > 1 the k partial outputs are summed on the device
  of the highest-weight (primary) expert: ``reduce`` sends each other choice's output there, and ``p(l)`` is that
  device (top-1: no reduce, one all-to-all per layer exactly as ExFlow). After the last layer the token goes home
  once (``return``, charged to the last layer). Attention at ``p(l-1)`` needs the request's KV there: the
  context is kept coherent by holding every request's KV on every device of the group (our modelling
  assumption: KV memory x group size, and an all-gather of the iteration's new KV per layer, see
  :class:`EPComm`).

Device-local entries (the diagonal) cross no link. :func:`pair_tokens` gives the matrices; :class:`EPComm` times
them for a token count per device on a system's all-to-all routes (bottleneck link plus route latency).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.placement import Placement

MODES = ("standard", "coherent")


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


def _choices(trace) -> tuple[np.ndarray, ...]:
    """(token row [N], layer [N], expert [N], weight [N], home device key [tokens], tokens) over the trace's
    (step, token) pairs numbered 0..tokens-1."""
    c = trace.columns
    key = c["step"].astype(np.int64) * (int(c["token"].max()) + 1) + c["token"].astype(np.int64)
    uniq, tok = np.unique(key, return_inverse=True)
    seq = c["sequence"] if "sequence" in c else c["token"]
    home_key = np.zeros(len(uniq), dtype=np.int64)
    home_key[tok] = c["step"].astype(np.int64) * (int(seq.max()) + 1) + seq.astype(np.int64)
    return tok, c["layer"].astype(np.int64), c["expert"].astype(np.int64), c["weight"], home_key, len(uniq)


def pair_tokens(trace, dev: np.ndarray, num_devices: int, mode: str, top1: bool = False) -> dict[str, np.ndarray]:
    """Token movements per token of the trace: name -> [layers, D, D] (see the module docstring). ``top1``: keep
    only each token's highest-weight choice per layer (the top-1 models of ExFlow's evaluation)."""
    if mode not in MODES:
        raise ValueError(f"EP mode must be one of {', '.join(MODES)}, got {mode!r}")
    tok, layer, expert, weight, home_key, n = _choices(trace)
    L, D = dev.shape[0], num_devices
    if int(layer.max()) >= L:
        raise ValueError(f"the trace has {int(layer.max()) + 1} layers, the placement {L}")
    _, home_idx = np.unique(home_key, return_inverse=True)
    home = home_idx % D
    # primary choice of each (layer, token): highest weight (ties: first row)
    order = np.lexsort((-weight, tok, layer))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (layer[order][1:] != layer[order][:-1]) | (tok[order][1:] != tok[order][:-1])
    primary_rows = order[first]
    keep = np.zeros(len(tok), dtype=bool)
    keep[primary_rows] = True
    if top1:
        tok, layer, expert, keep = tok[keep], layer[keep], expert[keep], np.ones(int(keep.sum()), dtype=bool)
    prim = np.full((L, n), -1, dtype=np.int64)
    prim[layer[keep], tok[keep]] = dev[layer[keep], expert[keep]]
    dst = dev[layer, expert]
    names = ("dispatch", "combine") if mode == "standard" else ("dispatch", "reduce", "return")
    out = {k: np.zeros((L, D, D)) for k in names}
    if mode == "standard":
        np.add.at(out["dispatch"], (layer, home[tok], dst), 1.0)
        out["combine"] = out["dispatch"].transpose(0, 2, 1).copy()
    else:
        pos = np.vstack([home[None, :], prim[:-1]])  # position before layer l
        np.add.at(out["dispatch"], (layer, pos[layer, tok], dst), 1.0)
        other = ~keep
        np.add.at(out["reduce"], (layer[other], dst[other], prim[layer[other], tok[other]]), 1.0)
        np.add.at(out["return"][L - 1], (prim[L - 1], home), 1.0)
    return {k: v / n for k, v in out.items()}


def crossings(pairs: dict[str, np.ndarray]) -> float:
    """Cross-device token movements per token and layer (all steps of the mode)."""
    total = 0.0
    for v in pairs.values():
        total += float(v.sum() - np.trace(v, axis1=1, axis2=2).sum())
    return total / next(iter(pairs.values())).shape[0]


@dataclass
class EPComm:
    """Seconds of the expert-parallel token movement of one MoE layer for ``tokens`` tokens per device.

    ``pairs``: :func:`pair_tokens` of the mode; ``routing``: the EP group's all-to-all routes
    (:func:`hwmodels.topology.all_to_all_routing`); ``bytes_per_token``: one token's activation on the wire;
    ``kv_bytes_per_token_layer``: KV bytes of one token in one layer (coherent mode all-gathers the new
    tokens' KV to every device of the group once per layer; 0 to leave it out); ``replicate_kv`` False: context
    coherence for free (no KV copies: the bound of the mode's gain). Model MoE layer j uses trace layer j mod
    (trace layers)."""

    pairs: dict[str, np.ndarray]
    routing: object
    bytes_per_token: float
    mode: str
    kv_bytes_per_token_layer: float = 0.0
    replicate_kv: bool = True  # coherent mode: every device of the group holds every request's KV
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def num_devices(self) -> int:
        return next(iter(self.pairs.values())).shape[1]

    def layer_times_s(self, tokens_per_device: int, moe_layers: int) -> tuple[np.ndarray, np.ndarray]:
        """(first step [moe_layers], second step [moe_layers]): dispatch, and combine (standard) or reduce +
        return + KV all-gather (coherent), seconds."""
        got = self._memo.get((tokens_per_device, moe_layers))
        if got is not None:
            return got
        scale = tokens_per_device * self.num_devices * self.bytes_per_token
        L = self.pairs["dispatch"].shape[0]
        per = {k: np.array([self.routing.duration_s(v[i] * scale) for i in range(L)]) for k, v in self.pairs.items()}
        first = per["dispatch"]
        second = per["combine"] if self.mode == "standard" else per["reduce"] + self._gather_s(tokens_per_device)
        idx = np.arange(moe_layers) % L
        first, second = first[idx], second[idx].copy()
        if self.mode == "coherent":
            second[-1] += per["return"][L - 1]
        self._memo[(tokens_per_device, moe_layers)] = (first, second)
        return first, second

    def _gather_s(self, tokens_per_device: int) -> float:
        """All-gather of every device's new KV (one layer) to every other device of the group."""
        d = self.num_devices
        if self.kv_bytes_per_token_layer <= 0 or d == 1:
            return 0.0
        m = np.full((d, d), tokens_per_device * self.kv_bytes_per_token_layer)
        return self.routing.duration_s(m)


def split_by_sequence(trace, fit_fraction: float = 0.5):
    """(fit, held-out) traces: the first ``fit_fraction`` of each step's sequences and the rest (placements are
    fitted on one part and judged on the other)."""
    from workloads.trace import Trace

    c = trace.columns
    seq = c["sequence"] if "sequence" in c else c["token"]
    cut = np.quantile(np.unique(seq), fit_fraction)
    fit = seq <= cut
    if fit.all() or not fit.any():
        raise ValueError("the trace has too few sequences to split into a fitting and a held-out part")
    return tuple(Trace(columns={k: v[m] for k, v in c.items()}, meta=trace.meta) for m in (fit, ~fit))


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


def ep_comm(cfg, system, ep: int, trace, placement: Placement, mode: str, dtype: str,
            kv_bytes_per_token_layer: float = 0.0, eval_trace=None, replicate_kv: bool = True) -> EPComm:
    """An :class:`EPComm` for ``cfg`` with experts placed by ``placement`` over the first ``ep`` devices of
    ``system``, token movement measured on ``eval_trace`` (default ``trace``)."""
    from hwmodels.collectives import a2a_payload_bytes
    from hwmodels.topology import all_to_all_routing
    from moesim.train.collectives import group_system

    if placement.num_devices != ep:
        raise ValueError(f"the placement spans {placement.num_devices} devices, --ep is {ep}")
    if trace.meta.num_experts != cfg.num_experts:
        raise ValueError(f"the trace has {trace.meta.num_experts} experts per layer, {cfg.name} {cfg.num_experts}")
    pairs = pair_tokens(eval_trace if eval_trace is not None else trace, expert_device(placement), ep, mode)
    routing = all_to_all_routing(group_system(system, ep))
    return EPComm(pairs, routing, a2a_payload_bytes(1, cfg.hidden_size, dtype), mode,
                  kv_bytes_per_token_layer if mode == "coherent" and replicate_kv else 0.0,
                  replicate_kv=replicate_kv)
