"""``moesim capture-demo`` (train a small Mixtral-style MoE on real text and capture its routing),
``moesim trace-stats`` (routing statistics of a trace) and ``moesim synth`` (fit + generate, or validate)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from moesim.cli._common import float_in, int_in


def register(sub) -> None:
    p = sub.add_parser("capture-demo", help="train a small Mixtral-style MoE on the Python stdlib's source "
                       "(byte level, CPU) and capture the routing of training and of a generation pass")
    p.add_argument("--out", default="run/capture-demo", help="output directory (must not exist or be empty)")
    p.add_argument("--seconds", type=float_in(0, 86400, open_lo=True), default=60.0,
                   help="training time budget in seconds")
    p.add_argument("--max-steps", type=int_in(1, 10_000_000), default=400, help="at most this many optimizer steps")
    p.add_argument("--batch", type=int_in(1, 4096), default=8, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int_in(2, 65536), default=64, help="bytes per sequence")
    p.add_argument("--accum", type=int_in(1, 1024), default=1,
                   help="micro-batches per optimizer step (gradient accumulation)")
    p.add_argument("--gen-tokens", type=int_in(0, 65536), default=32, help="tokens generated after training")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    p.set_defaults(func=_demo)
    p = sub.add_parser("trace-stats", help="per-layer load, imbalance, entropy, Gini, locality of a trace")
    p.add_argument("trace", help="trace name or path (default, flame, switch, .parquet, capture dir) or an "
                   "expert-load table (.json[.gz] with logical_count: its own per-layer statistics)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_stats)
    p = sub.add_parser("synth", help="fit the synthetic generator to a trace and write a generated trace, "
                       "or --validate it against held-out real data and the uniform/Zipf baselines")
    p.add_argument("--fit", default="default", help="real trace to fit (name or path)")
    p.add_argument("--out", help="write the generated trace here (.parquet)")
    p.add_argument("--tokens", type=int_in(1, 100_000_000), default=4096, help="tokens per step")
    p.add_argument("--steps", type=int_in(1, 1_000_000), default=1, help="steps to generate")
    p.add_argument("--experts", type=int_in(1, 65536), help="num_experts (default: fitted)")
    p.add_argument("--top-k", type=int_in(1, 1024), help="top-k (default: fitted)")
    p.add_argument("--layers", type=int_in(1, 4096), help="num_layers (default: fitted)")
    p.add_argument("--seed", type=int_in(0, None), default=0, help="seed of the random generators (reproducible runs)")
    p.add_argument("--validate", action="store_true", help="print the validation table (FLAME + OLMoE stats)")
    p.set_defaults(func=_synth)


# ---------------------------------------------------------------- capture-demo

def stdlib_bytes(limit_bytes: int = 4_000_000) -> np.ndarray:
    """Real text present on every machine: the Python standard library's own .py sources, as uint8 [n]."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit_bytes:
            break
    if not chunks:
        raise ValueError(f"no Python sources found under {root}")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8)


def demo_model(seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2, num_experts: int = 8, top_k: int = 2):
    """A small Mixtral-style causal LM (byte vocabulary, random init, no download)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                           num_local_experts=num_experts, num_experts_per_tok=top_k, max_position_embeddings=512,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, router_aux_loss_coef=0.01,
                           output_router_logits=True, tie_word_embeddings=False)
    return tf.AutoModelForCausalLM.from_config(cfg)


def run_demo(out: str | Path, *, seconds: float = 60.0, max_steps: int = 400, batch: int = 8, seq_len: int = 64,
             accum: int = 1, gen_tokens: int = 32, seed: int = 0, progress=None) -> dict:
    """Train + capture + generate + capture. Returns a summary dict (also written to ``out/summary.json``)."""
    import torch

    from workloads.capture import capture
    from workloads.importers import load_trace

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output directory {out} is not empty; choose a new one")
    text = torch.from_numpy(stdlib_bytes().astype(np.int64))
    model = demo_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    n_train = int(len(text) * 0.9)
    t0 = time.perf_counter()
    losses = []
    model.train()
    with capture(model, out / "train", optimizer=opt, model_name="moesim-demo-mixtral", record_token_ids=True) as cap:
        for step in range(max_steps):
            for _ in range(accum):
                start = torch.randint(0, n_train - seq_len - 1, (batch,), generator=gen)
                ids = torch.stack([text[s:s + seq_len] for s in start.tolist()])
                loss = model(input_ids=ids, labels=ids).loss / accum
                loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()) * accum)
            if progress:
                progress(step + 1)
            if time.perf_counter() - t0 > seconds:
                break
    train_s = time.perf_counter() - t0
    if cap.error is not None:
        raise ValueError(f"capture of training failed: {cap.error}")
    model.eval()
    prompt = torch.stack([text[n_train + i * 97:n_train + i * 97 + 16] for i in range(4)])
    with capture(model, out / "generate", model_name="moesim-demo-mixtral") as gcap, torch.no_grad():
        generated = model.generate(input_ids=prompt, max_new_tokens=gen_tokens, min_new_tokens=gen_tokens,
                                   do_sample=False, pad_token_id=0)
    if gcap.error is not None:
        raise ValueError(f"capture of generation failed: {gcap.error}")
    tr = load_trace(out / "train")
    summary = {"steps": len(losses), "train_s": round(train_s, 2), "loss_first": losses[0], "loss_last": losses[-1],
               "train_rows": len(tr), "generate_rows": len(load_trace(out / "generate")),
               "generated_text": bytes(generated[0].tolist()).decode("latin-1")}
    summary.update(routing_change(tr))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def routing_change(trace) -> dict:
    """Routing early vs late in training: load TVD between the first and last quarter of steps, per-layer
    load entropy (bits) and expert specialisation = mutual information I(byte; expert) in bits."""
    from workloads import stats

    steps = np.unique(trace.columns["step"])
    q = max(1, len(steps) // 4)
    early = trace.select(trace.columns["step"] <= steps[q - 1])
    late = trace.select(trace.columns["step"] >= steps[-q])
    le, ll = stats.expert_load(early), stats.expert_load(late)
    return {"load_tvd_early_late": [stats.tvd(le[i], ll[i]) for i in range(trace.meta.num_layers)],
            "entropy_early_bits": stats.load_entropy(early).tolist(),
            "entropy_late_bits": stats.load_entropy(late).tolist(),
            "specialisation_early_bits": _mutual_info(early).tolist(),
            "specialisation_late_bits": _mutual_info(late).tolist()}


def _mutual_info(trace) -> np.ndarray:
    """I(token id; top-1 expert) per layer in bits (needs the ``token_id`` or falls back to position)."""
    col = "token_id" if "token_id" in trace.columns else "position"
    out = np.zeros(trace.meta.num_layers)
    for layer in range(trace.meta.num_layers):
        m = (trace.columns["layer"] == layer) & (trace.columns["rank"] == 0)
        a, b = trace.columns[col][m].astype(np.int64), trace.columns["expert"][m].astype(np.int64)
        joint = np.bincount(a * trace.meta.num_experts + b, minlength=(a.max() + 1) * trace.meta.num_experts)
        joint = joint.reshape(-1, trace.meta.num_experts).astype(np.float64)
        joint /= joint.sum()
        pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[layer] = float(np.nansum(np.where(joint > 0, joint * np.log2(joint / (pa * pb)), 0.0)))
    return out


def _demo(args) -> int:
    from moesim.cli._common import check_writable, progress_bar

    check_writable(args.out, directory=True)
    with progress_bar("training", total=args.max_steps, unit="step") as update:
        s = run_demo(args.out, seconds=args.seconds, max_steps=args.max_steps, batch=args.batch, seq_len=args.seq_len,
                     accum=args.accum, gen_tokens=args.gen_tokens, seed=args.seed, progress=update)
    print(f"trained {s['steps']} steps in {s['train_s']} s, loss {s['loss_first']:.3f} -> {s['loss_last']:.3f}")
    print(f"traces: {args.out}/train ({s['train_rows']} rows), {args.out}/generate ({s['generate_rows']} rows)")
    for i, tvd in enumerate(s["load_tvd_early_late"]):
        print(f"layer {i}: load TVD early->late {tvd:.3f}; entropy {s['entropy_early_bits'][i]:.3f} -> "
              f"{s['entropy_late_bits'][i]:.3f} bits; I(byte; expert) {s['specialisation_early_bits'][i]:.3f} -> "
              f"{s['specialisation_late_bits'][i]:.3f} bits")
    return 0


# ---------------------------------------------------------------- trace-stats

def _stats(args) -> int:
    from workloads import stats
    from workloads.importers import load_table_spec, load_trace

    table_path, _ = load_table_spec(args.trace)
    if table_path is not None:
        return _table_stats(table_path, args.json)
    trace = load_trace(args.trace)
    rows = stats.layer_summary(trace)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    m = trace.meta
    print(f"{m.model}: {trace.num_tokens} tokens, {m.num_layers} layers, {m.num_experts} experts, top-{m.top_k}")
    print("layer  max/mean  entropy(bits)  share   gini   locality  unused")
    for r in rows:
        print(f"{r['layer']:5d}  {r['max_over_mean']:8.3f}  {r['entropy_bits']:13.3f}  {r['entropy_share']:5.3f}  "
              f"{r['gini']:5.3f}  {r['temporal_locality']:8.3f}  {r['experts_unused']:6d}")
    print(f"(random choice gives locality about top_k/num_experts = {m.top_k / m.num_experts:.3f})")
    return 0


def _table_stats(path, as_json: bool) -> int:
    """The expert-load table's own statistics (no expansion)."""
    from workloads.load_table import read_load_table, table_stats

    table = read_load_table(path)
    rows = table_stats(table)
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    mom = [r["max_over_mean"] for r in rows]
    print(f"{path.name}: load table of {table.model}, {table.num_tokens} tokens, {len(rows)} MoE layers (table rows "
          f"{table.moe_layers[0]}-{table.moe_layers[-1]}), {table.num_experts} experts, top-{table.top_k}; max/mean "
          f"{min(mom):.2f}-{max(mom):.2f}, mean {sum(mom) / len(mom):.2f}")
    print("layer  row  max/mean  max/tokens  min/mean     cv  entropy(bits)   gini  unused")
    for r in rows:
        print(f"{r['layer']:5d}  {r['model_layer']:3d}  {r['max_over_mean']:8.3f}  {r['max_share_of_tokens']:10.3f}  "
              f"{r['min_over_mean']:8.3f}  {r['cv']:5.3f}  {r['entropy_bits']:13.3f}  {r['gini']:5.3f}  "
              f"{r['experts_unused']:6d}")
    return 0


# ---------------------------------------------------------------- synth

def _synth(args) -> int:
    from workloads import synth
    from workloads.importers import load_trace

    if args.validate:
        print(validation_report(seed=args.seed))
        return 0
    if not args.out:
        raise ValueError("synth: give --out PATH.parquet (or --validate)")
    from moesim.cli._common import check_writable
    from workloads.trace import write_parquet

    check_writable(args.out)
    model = synth.fit(load_trace(args.fit))
    trace = synth.generate(model, args.tokens, num_steps=args.steps, num_experts=args.experts, top_k=args.top_k,
                           num_layers=args.layers, seed=args.seed)
    write_parquet(trace, args.out)
    print(f"wrote {args.out}: {trace.num_tokens} tokens x {trace.meta.num_layers} layers, "
          f"{trace.meta.num_experts} experts, top-{trace.meta.top_k}")
    return 0


def validation_report(seed: int = 0) -> str:
    """Markdown tables: fitted generator vs uniform vs Zipf on FLAME (in-sample and held-out) and OLMoE stats."""
    from workloads import stats, synth
    from workloads.importers import find_shared_traces, load_trace

    lines = []
    real = load_trace("default")
    # held out: every other 64-token sequence (sequence ids are contiguous text chunks)
    odd = real.columns["sequence"] % 2 == 1
    train, test = real.select(~odd), real.select(odd)
    model = synth.fit(train)
    n = 32768
    m = real.meta
    cands = {"fitted": synth.generate(model, n, seed=seed),
             "uniform": synth.uniform_trace(n, m.num_experts, m.top_k, m.num_layers, seed=seed),
             "zipf": synth.zipf_trace(n, m.num_experts, m.top_k, m.num_layers, seed=seed)}
    floor = synth.compare(train, test)
    lines.append("FLAME-MoE-290M (fit on even 64-token sequences = 1024 tokens, held out: odd sequences)\n")
    lines.append("| generator | load TVD vs fit data (mean / max over 8 layers) | load TVD held-out | affinity TVD "
                 "held-out (mean over 7 layer pairs) | locality diff held-out (mean abs) |")
    lines.append("|---|---|---|---|---|")
    for name, c in cands.items():
        a, b = synth.compare(c, train), synth.compare(c, test)
        lines.append(f"| {name} | {a['load_tvd'].mean():.4f} / {a['load_tvd'].max():.4f} | {b['load_tvd'].mean():.4f} | "
                     f"{b['affinity_tvd'].mean():.4f} | {np.abs(b['locality_diff']).mean():.4f} |")
    lines.append(f"| real fit half vs real held-out half (sampling-noise floor) | - | {floor['load_tvd'].mean():.4f} | "
                 f"{floor['affinity_tvd'].mean():.4f} | {np.abs(floor['locality_diff']).mean():.4f} |")
    shared = find_shared_traces()
    if shared is not None and (shared / synth.OLMOE_STATS_DIR).is_dir():
        lines.append("\nOLMoE-paper per-domain load statistics (layers 0/7/15, ~208,896 tokens per domain): "
                     "load TVD of 32,768 generated tokens, mean over the 3 layers\n")
        lines.append("| model | domain | fitted | uniform | zipf |")
        lines.append("|---|---|---|---|---|")
        for mname in ("Mixtral", "OLMoE"):
            for domain in ("arxiv", "book", "c4", "github", "wikipedia"):
                try:
                    load, pairs, k = synth.load_olmoe_stats(shared, mname, domain)
                except ValueError:
                    continue
                fm = synth.fit_counts(load, pairs, k, source="OLMoE paper stats", model=mname)
                e = load.shape[1]
                g = synth.generate(fm, 32768, seq_len=64, seed=seed)
                u = synth.uniform_trace(32768, e, k, 3, seed=seed)
                z = synth.zipf_trace(32768, e, k, 3, seed=seed)
                vals = [np.mean([stats.tvd(stats.expert_load(t)[i], load[i]) for i in range(3)]) for t in (g, u, z)]
                lines.append(f"| {mname} | {domain} | {vals[0]:.4f} | {vals[1]:.4f} | {vals[2]:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
