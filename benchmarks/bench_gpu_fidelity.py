"""GPU fidelity benchmark: every figure of the fitted GPU cost models against public measurements.

Run: ``python -m benchmarks.bench_gpu_fidelity [--data ../shared/data/gpu-timings] [--out run/gpu-fidelity]``.
Prints every table (GEMM leave-one-model-out per GPU, DeepGEMM, LLMCompass, NCCL all-reduce and send/recv,
DeepEP from the collective model and through the simulator), writes ``benchmarks/results/gpu_fidelity.md`` and the HTML report with predicted-vs-measured plots.
Deterministic (no timing of this machine): the numbers depend only on the data and the code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import md_table

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
FLOAT_FMT = "{:.4g}"


def _mape(err) -> str:
    a = err.abs()
    return f"MAPE {a.mean():.1f} %, worst {a.max():.1f} % over {len(a)}"


def deepep_via_simulator(doc: dict, tokens_per_gpu: int = 4096, seed: int = 0):
    """DeepEP's intranode normal-kernel figures (EP8) through the simulator: one MoE layer of DeepSeek-V3
    (hidden 7168, 256 experts, top-8) on ``hgx-h800``, ``tokens_per_gpu`` tokens per GPU routed uniformly at
    random (8 distinct experts each), fp8 dispatch and bf16 combine; the default cost model (``predicted``) and
    ``--cost roofline`` (spec bottleneck link, ``roofline``). Bandwidth as DeepEP states it: bytes the busiest GPU
    sends to other GPUs / the all-to-all's simulated time."""
    import numpy as np
    import pandas as pd

    from hwmodels.cost import RooflineCost, collective_model, default_cost_model
    from hwmodels.specs import load_system
    from moebase.units import GB, US
    from moesim.placement import contiguous
    from moesim.sim import SimOptions, simulate
    from workloads.catalog import get_model
    from workloads.trace import TraceMeta, from_dense

    system, model = load_system("hgx-h800"), get_model("deepseek-v3")
    d, e, k = system.num_devices, model.num_experts, model.num_experts_per_tok
    n = d * tokens_per_gpu
    ids = np.argsort(np.random.default_rng(seed).random((n, e)), axis=1)[:, :k].reshape(n, 1, k)
    trace = from_dense(ids, None, TraceMeta(model=model.name, num_experts=e, top_k=k, num_layers=1,
                                            source=f"uniform top-{k}, seed {seed}"))
    opts = SimOptions(dtype="bf16", dispatch_dtype="fp8", combine_dtype="bf16")
    fitted, roof = default_cost_model(system.device), RooflineCost()

    def gb_per_s_and_s(cost, op):
        ops = simulate(system, model, contiguous(1, e, d), trace, cost=cost, options=opts).ops
        ops = ops[ops["op"] == op]
        t = float((ops["end_at_s"] - ops["start_at_s"]).max())
        return float(ops["bytes"].max()) / t / GB, t

    rows = []
    for entry in doc.get("all_to_all", []):
        if int(entry["ep"]) != d:
            continue
        op, pub = entry["op"], float(entry["value_gb_per_s"])
        pred, t = gb_per_s_and_s(fitted, op)
        roof_pred, _ = gb_per_s_and_s(roof, op)
        dtype = opts.dispatch_dtype if op == "dispatch" else opts.combine_dtype
        rows.append({"check": f"normal {op} EP{d} (simulator)", "unit": "GB/s", "published": pub, "predicted": pred,
                     "error_pct": (pred / pub - 1) * 100, "simulated_us": t / US, "roofline": roof_pred,
                     "roofline_error_pct": (roof_pred / pub - 1) * 100,
                     "model": f"{fitted.name} + {collective_model(fitted, system).name}, {op} in {dtype}"})
    return pd.DataFrame(rows)


def build_markdown(res: dict) -> str:
    lomo = res["lomo"][["gpu", "set", "rows", "mape_pct", "median_ape_pct", "worst_pct", "train_mape_pct"]]
    dg, llm, de = res["deepgemm"], res["llmcompass"], res["deepep"]
    big = llm[~llm["floor"]]
    out = ["# GPU fidelity (python -m benchmarks.bench_gpu_fidelity)", "",
           "## GEMM: leave one Vidur model out (held-out MAPE per model; train_mape_pct = fit on the other two)", "",
           md_table(lomo.rename(columns={"set": "held-out model"}), FLOAT_FMT), ""]
    for gpu, g in res["lomo"].groupby("gpu"):
        out.append(f"* {gpu}: mean held-out MAPE {g['mape_pct'].mean():.2f} %, worst model {g['mape_pct'].max():.2f} %")
    out += ["", "## DeepGEMM FP8 GEMMs, H800 (fp8 efficiencies fitted on the dense table only, role 'fit'; the "
            "grouped contiguous and masked tables are held out, role 'held-out')", "", md_table(dg, FLOAT_FMT), ""]
    for (role, layout), g in dg.groupby(["role", "layout"], sort=False):
        out.append(f"* {layout} ({'fit error' if role == 'fit' else 'held-out error'}): fitted model "
                   f"{_mape(g['error_pct'])}; spec roofline "
                   f"{_mape((g['roofline_tflops'] / g['published_tflops'] - 1) * 100)}")
    out += ["", "## LLMCompass A100 matmul sweep (held out; shapes under 10 GFLOP excluded: ~30 us timer floor)", "",
            md_table(llm, FLOAT_FMT), ""]
    for spec, g in big.groupby("spec"):
        out.append(f"* on {spec}: fitted {_mape(g['error_pct'])}; spec roofline {_mape(g['roofline_error_pct'])}")
    out += ["", "## NCCL collectives (Vidur DGX nodes): fitted vs held-out", "",
            md_table(res["collectives"][["fabric", "collective", "set", "kind", "rows", "mape_pct", "median_ape_pct",
                                         "worst_pct"]], FLOAT_FMT), "",
            "## DeepEP on H800 (predicted; not fitted)", "", md_table(de, FLOAT_FMT), ""]
    for normal, g in de.groupby(de["check"].str.startswith("normal")):
        out.append(f"* {'normal (GB/s)' if normal else 'low-latency (us)'}: {_mape(g['error_pct'])}")
    if "deepep_sim" in res:
        ds = res["deepep_sim"]
        out += ["", "## DeepEP intranode EP8 through the simulator (hgx-h800, DeepSeek-V3 layer, 4096 tokens/GPU, "
                "uniform top-8, fp8 dispatch / bf16 combine; predicted, not fitted)", "", md_table(ds, FLOAT_FMT), "",
                f"* default cost model: {_mape(ds['error_pct'])}; --cost roofline: {_mape(ds['roofline_error_pct'])}"]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gpu-timings"))
    ap.add_argument("--out", default=str(REPO / "run" / "gpu-fidelity"), help="where the HTML report goes")
    ap.add_argument("--results", default=str(RESULTS), help="where gpu_fidelity.md goes")
    args = ap.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"no GPU timing data at {args.data} (see ../shared/data/gpu-timings/README.md)", file=sys.stderr)
        return 2
    from hwmodels.gpu_fit import gpu_fidelity, published
    from moesim.report.validation import write_gpu_fidelity_report

    res = gpu_fidelity(args.data)
    res["deepep_sim"] = deepep_via_simulator(published())
    text = build_markdown(res)
    print(text)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / "gpu_fidelity.md").write_text(text)
    path = write_gpu_fidelity_report(Path(args.out) / "gpu_fidelity.html", res)
    print(f"wrote {Path(args.results) / 'gpu_fidelity.md'} and {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
