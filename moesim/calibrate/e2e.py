"""End-to-end check: time a real PyTorch MoE layer stack on this machine and compare each layer with the
simulator's prediction (calibrated cost model fitted on the same machine).

The stack is Mixtral-style (router, top-k, SwiGLU experts, no shared experts), built from a config dict
with Hugging Face names (``hidden_size``, ``intermediate_size``, ``num_local_experts``,
``num_experts_per_tok``, ``num_hidden_layers``). Each layer runs its router (GEMM + softmax + top-k) but
replays the real routing of the trace (expert ids and gate weights of FLAME-MoE-290M) instead of its own
choice, then permutes tokens into expert order, runs the experts and scatter-adds the weighted results.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd

from moebase.units import NS


def mixtral_config(model, num_layers: int) -> dict:
    """A Mixtral-style config (HF names) with the shapes of catalog ``model``."""
    return {"hidden_size": model.hidden_size, "intermediate_size": model.moe_intermediate_size,
            "num_local_experts": model.num_experts, "num_experts_per_tok": model.num_experts_per_tok,
            "num_hidden_layers": num_layers}


def time_moe_stack(config: dict, experts: np.ndarray, weights: np.ndarray, *, dtype: str = "fp32",
                   threads: int | None = None, repeats: int = 5, seed: int = 0) -> np.ndarray:
    """Times (s) per forward pass and layer [repeats, num_hidden_layers] of the stack replaying ``experts`` /
    ``weights`` [tokens, layers, top_k] (expert ids, gate weights); one untimed warm-up pass first."""
    import torch

    from moesim.calibrate.bench import expert_ffn_loop, expert_order, permute, router_topk, torch_dtype, unpermute

    h, f = config["hidden_size"], config["intermediate_size"]
    e, k, n_layers = config["num_local_experts"], config["num_experts_per_tok"], config["num_hidden_layers"]
    t_count = experts.shape[0]
    if experts.shape[1] < n_layers or experts.shape[2] < k:
        raise ValueError(f"routing {experts.shape} does not cover {n_layers} layers x top-{k}")
    dt = torch_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        layers = []
        for layer in range(n_layers):
            tok, offsets, order = expert_order(experts[:, layer, :k], e)
            w = weights[:, layer, :k].ravel()[order]
            layers.append({
                "w_gate": torch.randn(h, e, generator=gen).to(dt) * h**-0.5,
                "w_up": (torch.randn(e, h, 2 * f, generator=gen) * h**-0.5).to(dt),
                "w_down": (torch.randn(e, f, h, generator=gen) * f**-0.5).to(dt),
                "tok": torch.as_tensor(tok, dtype=torch.int64), "offsets": offsets,
                "w": torch.as_tensor(w, dtype=torch.float32).to(dt)})
        x0 = torch.randn(t_count, h, generator=gen).to(dt)
        buf_in = torch.empty(t_count * k, h, dtype=dt)
        buf_out, scaled = torch.empty_like(buf_in), torch.empty_like(buf_in)
        out = torch.empty(t_count, h, dtype=dt)
        samples = np.empty((repeats + 1, n_layers))
        with torch.inference_mode():
            for r in range(repeats + 1):  # the first pass warms up
                x = x0
                for li, p in enumerate(layers):
                    a = time.perf_counter_ns()
                    router_topk(x, p["w_gate"], k)  # computed, then replaced by the trace's routing
                    permute(x, p["tok"], buf_in)
                    expert_ffn_loop(buf_in, p["offsets"], p["w_up"], p["w_down"], buf_out)
                    unpermute(buf_out, p["w"], p["tok"], scaled, out)
                    samples[r, li] = (time.perf_counter_ns() - a) * NS
                    x = x + out
        return samples[1:]
    finally:
        torch.set_num_threads(old)


def e2e_check(profile_path: str, *, tokens: int = 1024, num_layers: int = 8, repeats: int = 5,
              seed: int = 0, stat: str = "median") -> pd.DataFrame:
    """Measured vs simulated time per MoE layer for the first ``tokens`` tokens of the embedded FLAME trace
    with FLAME-MoE-290M routed-expert shapes (shared experts left out, as in Mixtral).

    ``stat`` is applied alike to the profile (the cost model is fitted to each shape's median or min time)
    and to the measured forward passes. Returns a DataFrame with layer, measured_s, predicted_s, error_pct;
    ``df.attrs['warnings']`` holds what the calibrated model warned about during the simulation."""
    from hwmodels.calib_profile import read_profile
    from hwmodels.calibrated import CalibratedCost
    from hwmodels.specs import Link, System
    from moesim.placement import contiguous
    from moesim.sim import SimOptions, simulate
    from workloads.catalog import get_model
    from workloads.importers import load_trace

    prof = read_profile(profile_path)
    if prof.meta.get("device_kind") != "cpu":
        raise ValueError(f"{profile_path}: the end-to-end check runs on this CPU; the profile is for "
                         f"{prof.device_name!r}")
    cost = CalibratedCost.fit(prof, stat=stat)
    device = cost.fitted_device("cpu")
    link = Link(kind="local", bandwidth_bytes_per_s=device.main_memory.bandwidth_bytes_per_s, latency_s=0.0)
    system = System(name="cpu-local", device=device, num_nodes=1, devices_per_node=1, scale_up=link,
                    scale_out=None, host_link=link, host_memory=device.main_memory)
    trace = load_trace("default")
    trace = trace.select(trace.columns["token"] < tokens)
    model = get_model("flame-moe-290m")
    experts, weights = trace.dense()
    config = mixtral_config(model, min(num_layers, trace.meta.num_layers))
    samples = time_moe_stack(config, experts, weights, dtype=prof.dtype, threads=prof.meta.get("num_threads"),
                             repeats=repeats, seed=seed)
    measured = np.median(samples, axis=0) if stat == "median" else samples.min(axis=0)
    keep = trace.columns["layer"] < config["num_hidden_layers"]
    trace = trace.select(keep)
    from dataclasses import replace

    trace = replace(trace, meta=replace(trace.meta, num_layers=config["num_hidden_layers"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = simulate(system, model, contiguous(trace.meta.num_layers, model.num_experts, 1), trace, cost=cost,
                       options=SimOptions(dtype=prof.dtype, include_shared_experts=False), seed=seed)
    pred = res.layer_time_s
    df = pd.DataFrame({"layer": np.arange(len(measured)), "measured_s": measured, "predicted_s": pred,
                       "error_pct": (pred / measured - 1) * 100})
    df.attrs["warnings"] = sorted({str(w.message) for w in caught})
    return df
