"""Serving throughput against published measurements of large MoE deployments (docs/validation.md).

Each case names its source, configuration and figure. The prediction runs the serving iteration cost
(:class:`moesim.serve.cost.IterationCost`, default cost model of the device) at the published operating point:

- ``decode``: every data-parallel rank decodes ``B`` requests whose KV holds ``context`` tokens: the published
  requests per rank where given, else the largest batch whose iteration meets the published per-token latency
  (``latency_s``: the mean per-user output speed's inverse); throughput = devices per node x B / iteration.
- ``prefill``: every rank prefills ``batch_per_rank`` prompts of ``context`` tokens in one iteration;
  throughput = devices per node x prompts x context / iteration.

Layouts: the decode cases run at the published EP144 on 18 nodes with 32 redundant experts (256 + 32 = 288 slots,
2 per GPU), the placement fitted by EPLB's global policy (``greedy`` of :mod:`moesim.place`, as ``moesim serve
--placement greedy --redundant-slots 32``), on two routings: balanced (a balanced routing trace,
:func:`moesim.train.routing.balanced_trace`, replicated by EPLB) and the expert loads SGLang published for
DeepSeek-V3 decode (``deepseek-v3-expert-loads/decode_in1000out1000``, read from ../shared at run time; the
placement is fitted on the same loads it replays: EPLB's best case). The earlier nearest layout without replicas
(EP128 on 16 nodes, balanced) stays as a reference row of each decode case. A row whose load table is missing is
reported as skipped.

    .venv/bin/python -m moesim.serve.validation
"""

from __future__ import annotations

from dataclasses import dataclass

from moesim.serve.cost import BatchWork, IterationCost, ServeLayout

MAX_BATCH = 4096


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    model: str
    system: str
    nodes: int
    ep: int
    phase: str  # decode | prefill
    context: int  # KV tokens per decoding request, or prompt tokens per prefill
    latency_s: float | None  # decode: the per-token latency the batch must meet
    published_tokens_per_s_per_node: float
    layout_note: str
    dtype: str = "fp8"
    two_batch_overlap: bool = True
    batch_per_rank: int | None = None  # published requests per rank (decode) or prompts per iteration (prefill)
    redundant_slots: int = 0  # EPLB replicas over the EP group (with ``placement``)
    placement: str | None = None  # a moesim.place method fitted on the routing (None: contiguous, no replicas)
    routing: str = "balanced"  # balanced, or a routing trace spec (workloads.importers.load_trace)
    host_overhead: str = "cuda-graphs"  # moesim.train.host; "eager" where the engine ran without CUDA graphs


#: the SGLang DeepSeek-V3 decode loads (shared/data/traces/deepseek-v3-expert-loads, SGLang issue #6017), expanded
SGLANG_DECODE = "deepseek-v3-expert-loads/decode_in1000out1000.json.gz:tokens=8192,seed=0"
BALANCED_TRACE_TOKENS = 8192  # tokens of the balanced routing trace EPLB places replicas on (one layer, seed 0)
DEEPSEEK_SOURCE = ("DeepSeek, 'Day 6: DeepSeek-V3/R1 Inference System Overview', "
                   "github.com/deepseek-ai/open-infra-index, 2025-03-01: ~14.8k output tokens/s per H800 node in "
                   "decode, average output speed 20-22 tokens/s per user, average KV length per output token 4,989; "
                   "decode EP144/DP144 on 18 nodes, 32 redundant routed experts, 2 routed experts per GPU")
RTP_SOURCE = ("Alibaba RTP-LLM, 'RTP-LLM DeepSeek Reproduce Tech Report' (H800 RoCE, PD disaggregation, TP1, "
              "DP = EP = GPUs, 4K input / 2K output): 'Decode 实例采用144 EP 部署（128 + 16 冗余）' (decode instance "
              "EP144 = 128 + "
              "16 redundant GPUs: at 2 slots per GPU, 32 redundant experts; 16 redundant slots would not give a whole "
              "number of slots per GPU) on 18 nodes reaches the 20 tokens/s per-user SLA at 13,200 concurrent "
              "requests, 1,850 tokens/s per GPU (14.8k per node)")


def _decode_cases(name: str, source: str, context: int, latency_s: float | None, batch: int | None,
                  note: str, host_overhead: str = "cuda-graphs") -> tuple[Case, ...]:
    """A decode case at the published EP144 with 32 redundant experts (balanced and SGLang routing) and at the
    nearest layout without replicas (EP128 on 16 nodes, balanced)."""
    ep144 = dict(model="deepseek-v3", system="hgx-h800", nodes=18, ep=144, phase="decode", context=context,
                 latency_s=latency_s, published_tokens_per_s_per_node=14_800, batch_per_rank=batch,
                 redundant_slots=32, placement="greedy", host_overhead=host_overhead)
    return (Case(f"{name} (EP144, 32 redundant, balanced)", source, **ep144,
                 layout_note=f"as published: EP144 on 18 nodes, 256 + 32 slots by EPLB (greedy) on balanced "
                 f"routing; {note}"),
            Case(f"{name} (EP144, 32 redundant, SGLang loads)", source, **ep144, routing=SGLANG_DECODE,
                 layout_note=f"as published: EP144 on 18 nodes, 256 + 32 slots by EPLB (greedy) fitted on and "
                 f"routed by SGLang's DeepSeek-V3 decode loads; {note}"),
            Case(f"{name} (EP128, no replicas, balanced)", source, **{**ep144, "nodes": 16, "ep": 128,
                                                                     "redundant_slots": 0, "placement": None},
                 layout_note=f"nearest layout without replicas: EP128/DP128 on 16 nodes; {note}"))


CASES = (
    *_decode_cases("DeepSeek online service, decode", DEEPSEEK_SOURCE, 4989, 1 / 21, None,
                   "largest batch meeting 1/21 s per token"),
    *_decode_cases("RTP-LLM DeepSeek-V3 reproduction, decode", RTP_SOURCE, 4096 + 1024, None, 92,
                   "13,200 / 144 = 92 requests per rank; KV = 4K prompt + half of the 2K output", "eager"),
    Case("RTP-LLM DeepSeek-V3 reproduction, prefill", "Alibaba RTP-LLM, same report: prefill instance EP32 on 4 nodes; "
         "one GPU runs two 4K requests in 1.5 s, 5,333 tokens/s per GPU (42.6k per node)", "deepseek-v3",
         "hgx-h800", 4, 32, "prefill", 4096, None, 42_600, "as published: EP32/DP32 on 4 nodes (balanced; the report "
         "states no redundant experts for prefill)", batch_per_rank=2, host_overhead="eager"),
)


def _routing(case: Case, cfg, system):
    """(trace, placement) of the case: none for balanced routing without a placement."""
    if case.placement is None and case.routing == "balanced":
        return None, None
    from moesim.serve import exflow

    if case.routing == "balanced":
        from moesim.train.routing import balanced_trace
        trace = balanced_trace(cfg, BALANCED_TRACE_TOKENS, 1, seed=0)
    else:
        from workloads.importers import load_trace
        trace = load_trace(case.routing)
    placement = exflow.place(trace, case.placement or "contiguous", case.ep, min(case.ep, system.devices_per_node),
                             num_replicas=case.redundant_slots)
    return trace, placement


def _cost(case: Case) -> IterationCost:
    from hwmodels.specs import load_system
    from workloads.hf_config import load_config

    system = load_system(case.system).with_nodes(case.nodes)
    cfg = load_config(case.model)
    trace, placement = _routing(case, cfg, system)
    return IterationCost(cfg, system, ServeLayout(tp=1, ep=case.ep, dp=system.num_devices), dtype=case.dtype,
                         two_batch_overlap=case.two_batch_overlap, trace=trace, placement=placement,
                         host_overhead=case.host_overhead)


def decode_s(ic: IterationCost, batch: int, context: int) -> float:
    """One decode iteration of ``batch`` requests with ``context`` KV tokens each, on one rank."""
    return ic.rank_s(BatchWork(tokens=batch, sampled=batch, attention_pairs=batch * (context + 0.5),
                               kv_tokens_read=batch * (context + 1.0)))


def predict(case: Case) -> dict:
    """The simulator's tokens/s per node at the case's operating point (see the module docstring)."""
    ic = _cost(case)
    per_node = ic.system.devices_per_node
    if case.phase == "prefill":
        n, k = case.context, case.batch_per_rank or 1
        dt = ic.rank_s(BatchWork(tokens=k * n, sampled=k, attention_pairs=k * 0.5 * n * n, kv_tokens_read=k * float(n)))
        return {"batch_per_rank": k, "iteration_s": dt, "tokens_per_s_per_node": per_node * k * n / dt}
    if case.batch_per_rank is not None:
        dt = decode_s(ic, case.batch_per_rank, case.context)
        return {"batch_per_rank": case.batch_per_rank, "iteration_s": dt,
                "tokens_per_s_per_node": per_node * case.batch_per_rank / dt}
    cap = ic.kv_capacity_tokens_per_device // case.context
    lo, hi = 0, min(MAX_BATCH, cap)
    while lo < hi:  # largest batch meeting the latency (iteration time grows with the batch)
        mid = (lo + hi + 1) // 2
        if decode_s(ic, mid, case.context) <= case.latency_s:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        return {"batch_per_rank": 0, "iteration_s": decode_s(ic, 1, case.context), "tokens_per_s_per_node": 0.0}
    dt = decode_s(ic, lo, case.context)
    return {"batch_per_rank": lo, "iteration_s": dt, "tokens_per_s_per_node": per_node * lo / dt}


def main() -> int:
    for case in CASES:
        try:
            p = predict(case)
        except (OSError, ValueError) as exc:  # e.g. the shared load tables are not next to the repository
            if case.routing == "balanced":
                raise
            print(f"{case.name}: skipped ({exc})")
            continue
        err = p["tokens_per_s_per_node"] / case.published_tokens_per_s_per_node - 1
        print(f"{case.name}: simulated {p['tokens_per_s_per_node']:,.0f} tokens/s per node ({p['batch_per_rank']} "
              f"per rank, iteration {p['iteration_s'] * 1e3:.1f} ms), published {case.published_tokens_per_s_per_node:,.0f}"
              f": error {err * 100:+.1f} % [{case.layout_note}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
