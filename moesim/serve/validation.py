"""Serving throughput against published measurements of large MoE deployments (docs/validation.md).

Each case names its source, configuration and figure. The prediction runs the serving iteration cost
(:class:`moesim.serve.cost.IterationCost`, default cost model of the device) at the published operating point:

- ``decode``: every data-parallel rank decodes ``B`` requests whose KV holds ``context`` tokens: the published
  requests per rank where given, else the largest batch whose iteration meets the published per-token latency
  (``latency_s``: the mean per-user output speed's inverse); throughput = devices per node x B / iteration.
- ``prefill``: every rank prefills ``batch_per_rank`` prompts of ``context`` tokens in one iteration;
  throughput = devices per node x prompts x context / iteration.

Where the published layout cannot be laid out here (DeepSeek's EP144 with 32 redundant experts: 144 does
not divide the 256 experts and replicas are not modelled in serving), the nearest layout is used and named.

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


CASES = (
    Case("DeepSeek online service, decode", "DeepSeek, 'Day 6: DeepSeek-V3/R1 Inference System Overview', "
         "github.com/deepseek-ai/open-infra-index, 2025-03-01: ~14.8k output tokens/s per H800 node in decode, "
         "average output speed 20-22 tokens/s per user, average KV length per output token 4,989",
         "deepseek-v3", "hgx-h800", 16, 128, "decode", 4989, 1 / 21, 14_800,
         "published EP144/DP144 on 18 nodes with 32 redundant experts; here EP128/DP128 on 16 nodes, no replicas"),
    Case("RTP-LLM DeepSeek-V3 reproduction, decode", "Alibaba RTP-LLM, 'RTP-LLM DeepSeek Reproduce Tech Report' "
         "(H800 RoCE, PD disaggregation, TP1, DP = EP = GPUs, 4K input / 2K output): decode instance EP144 "
         "(128 + 16 redundant) on 18 nodes reaches the 20 tokens/s per-user SLA at 13,200 concurrent requests, "
         "1,850 tokens/s per GPU (14.8k per node)", "deepseek-v3", "hgx-h800", 16, 128, "decode",
         4096 + 1024, None, 14_800,
         "published EP144 with replicas; here EP128 on 16 nodes; 13,200 / 144 = 92 requests per rank; "
         "KV = 4K prompt + half of the 2K output", batch_per_rank=92),
    Case("RTP-LLM DeepSeek-V3 reproduction, prefill", "Alibaba RTP-LLM, same report: prefill instance EP32 on 4 nodes; "
         "one GPU runs two 4K requests in 1.5 s, 5,333 tokens/s per GPU (42.6k per node)", "deepseek-v3",
         "hgx-h800", 4, 32, "prefill", 4096, None, 42_600, "as published: EP32/DP32 on 4 nodes", batch_per_rank=2),
)


def _cost(case: Case) -> IterationCost:
    from hwmodels.specs import load_system
    from workloads.hf_config import load_config

    system = load_system(case.system).with_nodes(case.nodes)
    return IterationCost(load_config(case.model), system, ServeLayout(tp=1, ep=case.ep, dp=system.num_devices),
                         dtype=case.dtype, two_batch_overlap=case.two_batch_overlap)


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
        p = predict(case)
        err = p["tokens_per_s_per_node"] / case.published_tokens_per_s_per_node - 1
        print(f"{case.name}: simulated {p['tokens_per_s_per_node']:,.0f} tokens/s per node ({p['batch_per_rank']} "
              f"per rank, iteration {p['iteration_s'] * 1e3:.1f} ms), published {case.published_tokens_per_s_per_node:,.0f}"
              f": error {err * 100:+.1f} % [{case.layout_note}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
