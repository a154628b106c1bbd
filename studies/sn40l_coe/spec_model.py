"""SN40L Composition-of-Experts study, the earlier spec-number model (kept beside the serving-engine run.py).

Question: from the shipped hardware specs alone, how much faster is model switching on one SN40L node
than on a DGX H100 / DGX A100, how much faster is serving (batch 8, 20 output tokens), and how many
machines hold 850 Llama-2-7B experts? Paper: Prabhakar et al., arXiv:2405.07518 (MICRO 2024).

Run from the repository root:  .venv/bin/python -m studies.sn40l_coe.spec_model  [--prompt-tokens 128] [--json out.json]

Nothing here is fitted to the paper's figures: every number comes from hwmodels/specs/*.toml or from
the PARAMETERS below (each with its reason); the paper's figures are only printed beside the results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from hwmodels.specs import load_system
from moesim.memory.coe import Deployment, ExpertModel

PAPER = {  # Prabhakar et al. 2024, abstract and Sec. 6/7
    "switch_speedup_vs_dgx_h100": 15.0,
    "switch_speedup_vs_dgx_a100": 31.0,
    "overall_speedup_vs_dgx_h100": 3.7,
    "overall_speedup_vs_dgx_a100": 6.6,
    "footprint_reduction_850_experts": 19.0,
}

PARAMETERS = {
    # Samba-CoE runs each expert tensor-parallel over the node's 8 sockets (paper: one node serves the CoE).
    "sn40l_tp": 8,
    # A 7B expert fits one 80 GB GPU, so a DGX serves each expert on one GPU and copies it over that GPU's
    # PCIe link from host DDR (the paper's GPU baselines copy weights host -> HBM). tp = 8 is printed too.
    "dgx_tp": 1,
    "batch": 8,  # paper's setting
    "output_tokens": 20,  # paper's setting
    "prompt_tokens": 128,  # NOT given in the paper: an assumption; --prompt-tokens changes it
    "num_experts_footprint": 850,  # paper: 850 experts on one SN40L node
}


def _ratio_line(label: str, paper: float, sim: float) -> dict:
    return {"metric": label, "paper": paper, "simulated": sim, "simulated/paper": sim / paper,
            "within_20pct": abs(sim / paper - 1.0) <= 0.2}


def run(prompt_tokens: int | None = None) -> dict:
    p = dict(PARAMETERS)
    if prompt_tokens is not None:
        p["prompt_tokens"] = prompt_tokens
    model = ExpertModel.llama2_7b()
    sn = Deployment.from_system(load_system("sn40l-node"), tp=p["sn40l_tp"])
    dgx = {name: Deployment.from_system(load_system(name), tp=p["dgx_tp"]) for name in ("dgx-h100", "dgx-a100")}
    dgx8 = {name: Deployment.from_system(load_system(name), tp=8) for name in ("dgx-h100", "dgx-a100")}
    b, pt, ot = p["batch"], p["prompt_tokens"], p["output_tokens"]

    def terms(dep: Deployment) -> dict:
        sw = dep.switch_s(model)
        pre = dep.prefill_s(model, b * pt)
        dec = ot * dep.decode_step_s(model, b)
        ar = dep.allreduce_s(model, b * pt) + ot * dep.allreduce_s(model, b)
        return {"deployment": dep.name, "switch_s": sw, "prefill_s": pre, "decode_s": dec,
                "of_which_allreduce_s": ar, "total_s": sw + pre + dec}

    rows = [terms(sn)] + [terms(d) for d in dgx.values()] + [terms(d) for d in dgx8.values()]
    t_sn = rows[0]
    t_h, t_a = rows[1], rows[2]

    # footprint: nodes to hold N experts. SN40L: all in DDR of one node's sockets (tp-sharded);
    # DGX: all in HBM (no switching), whole models per GPU (tp=1) or 8-way shards per node (tp=8).
    n = p["num_experts_footprint"]
    sn_nodes = math.ceil(n / (sn.store_capacity_models(model)))
    h100 = load_system("dgx-h100")
    per_gpu = int(h100.device.main_memory.capacity_bytes // model.weight_bytes)
    dgx_nodes_tp1 = math.ceil(n / (per_gpu * h100.devices_per_node))
    per_node_tp8 = Deployment.from_system(h100, tp=8).slots(model)
    dgx_nodes_tp8 = math.ceil(n / per_node_tp8)

    comparisons = [
        _ratio_line("switch speedup vs DGX H100", PAPER["switch_speedup_vs_dgx_h100"], t_h["switch_s"] / t_sn["switch_s"]),
        _ratio_line("switch speedup vs DGX A100", PAPER["switch_speedup_vs_dgx_a100"], t_a["switch_s"] / t_sn["switch_s"]),
        _ratio_line("overall speedup vs DGX H100", PAPER["overall_speedup_vs_dgx_h100"], t_h["total_s"] / t_sn["total_s"]),
        _ratio_line("overall speedup vs DGX A100", PAPER["overall_speedup_vs_dgx_a100"], t_a["total_s"] / t_sn["total_s"]),
        _ratio_line("footprint reduction, 850 experts (DGX H100 tp1 nodes / SN40L nodes)",
                    PAPER["footprint_reduction_850_experts"], dgx_nodes_tp1 / sn_nodes),
    ]
    sensitivity = [
        {"variant": "DGX tp=8 (each GPU copies 1/8 over its own PCIe link)",
         "switch_vs_h100": rows[3]["switch_s"] / t_sn["switch_s"], "switch_vs_a100": rows[4]["switch_s"] / t_sn["switch_s"],
         "overall_vs_h100": rows[3]["total_s"] / t_sn["total_s"], "overall_vs_a100": rows[4]["total_s"] / t_sn["total_s"],
         "footprint": dgx_nodes_tp8 / sn_nodes},
        {"variant": "SN40L without tensor-parallel all-reduces",
         "switch_vs_h100": t_h["switch_s"] / t_sn["switch_s"], "switch_vs_a100": t_a["switch_s"] / t_sn["switch_s"],
         "overall_vs_h100": t_h["total_s"] / (t_sn["total_s"] - t_sn["of_which_allreduce_s"]),
         "overall_vs_a100": t_a["total_s"] / (t_sn["total_s"] - t_sn["of_which_allreduce_s"]),
         "footprint": dgx_nodes_tp1 / sn_nodes},
    ]
    return {"parameters": p, "terms": rows, "comparisons": comparisons, "sensitivity": sensitivity,
            "footprint_nodes": {"sn40l_node": sn_nodes, "dgx_h100_tp1": dgx_nodes_tp1, "dgx_h100_tp8": dgx_nodes_tp8,
                                "model_bytes": model.weight_bytes, "experts": n}}


def _print(res: dict) -> None:
    p = res["parameters"]
    print(f"SN40L CoE study: Llama-2-7B experts (bf16), batch {p['batch']}, {p['output_tokens']} output tokens, "
          f"{p['prompt_tokens']} prompt tokens (assumed)")
    print("\nPer-batch time terms [ms]:")
    print(f"  {'deployment':18s} {'switch':>9s} {'prefill':>9s} {'decode':>9s} {'allreduce':>10s} {'total':>9s}")
    for r in res["terms"]:
        print(f"  {r['deployment']:18s} {r['switch_s'] * 1e3:9.2f} {r['prefill_s'] * 1e3:9.2f} {r['decode_s'] * 1e3:9.2f} "
              f"{r['of_which_allreduce_s'] * 1e3:10.2f} {r['total_s'] * 1e3:9.2f}")
    print("\nPaper vs simulated:")
    print(f"  {'metric':70s} {'paper':>7s} {'sim':>7s} {'sim/paper':>9s}")
    for c in res["comparisons"]:
        flag = "" if c["within_20pct"] else "   <- outside +-20%"
        print(f"  {c['metric']:70s} {c['paper']:7.1f} {c['simulated']:7.2f} {c['simulated/paper']:9.2f}{flag}")
    f = res["footprint_nodes"]
    print(f"\nFootprint for {f['experts']} experts of {f['model_bytes'] / 1e9:.2f} GB: SN40L nodes {f['sn40l_node']}, "
          f"DGX H100 nodes {f['dgx_h100_tp1']} (whole models per GPU) / {f['dgx_h100_tp8']} (8-way shards)")
    print("\nSensitivity (speedups):")
    for s in res["sensitivity"]:
        print(f"  {s['variant']:56s} switch {s['switch_vs_h100']:.1f}x / {s['switch_vs_a100']:.1f}x, overall "
              f"{s['overall_vs_h100']:.2f}x / {s['overall_vs_a100']:.2f}x (H100 / A100), footprint {s['footprint']:.0f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length per request (paper does not give it)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    res = run(args.prompt_tokens)
    _print(res)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
