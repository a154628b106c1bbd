"""Capture-hook overhead on the CPU training example (``moesim capture-demo``'s model): step time with and
without the hook, measured side by side in one run (alternating blocks of steps, same model and data).

Run: ``python -m benchmarks.bench_capture [--rounds 6] [--block 5]``; writes ``benchmarks/results/capture.md``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from moebase.units import MS


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--block", type=int, default=5, help="steps per block (one block without, one with hook)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/capture.md")
    return ap.parse_args(argv)


def _trainer(args: argparse.Namespace):
    """(step, model, optimizer): ``step()`` runs one seeded training step and returns its seconds."""
    import torch

    from moesim.cli.capture import demo_model, stdlib_bytes

    torch.manual_seed(0)
    text = torch.from_numpy(stdlib_bytes().astype(np.int64))
    model = demo_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        start = torch.randint(0, len(text) - args.seq_len - 1, (args.batch,), generator=gen)
        ids = torch.stack([text[s:s + args.seq_len] for s in start.tolist()])
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t0

    return step, model, opt


def _measure(args: argparse.Namespace, step, model, opt) -> dict:
    """Alternating blocks of plain and hooked steps; step times, close times, rows and in-hook seconds."""
    from workloads.capture import capture
    from workloads.importers import load_trace

    for _ in range(3):  # warm-up
        step()
    plain, hooked, close_s, rows = [], [], [], 0
    in_hooks = [0.0]  # seconds the training thread spends inside the capture hooks (exact added work)

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                in_hooks[0] += time.perf_counter() - t0
        return wrapper

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            plain += [step() for _ in range(args.block)]
            d = Path(tmp) / f"r{r}"
            cap = capture(model, d, optimizer=opt)
            for name in ("_router_hook", "_model_pre", "_flush", "step"):
                setattr(cap, name, timed(getattr(cap, name)))
            with cap:
                hooked += [step() for _ in range(args.block)]
                t0 = time.perf_counter()
            close_s.append(time.perf_counter() - t0)
            rows += len(load_trace(d))
    return {"plain": plain, "hooked": hooked, "close_s": close_s, "rows": rows, "in_hooks_s": in_hooks[0]}


def _markdown(args: argparse.Namespace, m: dict) -> str:
    import torch

    plain, hooked = m["plain"], m["hooked"]
    p, h = np.median(plain), np.median(hooked)
    overhead = h / p - 1
    mean_over = np.mean(hooked) / np.mean(plain) - 1
    hook_ms = m["in_hooks_s"] / len(hooked) / MS
    hook_share = m["in_hooks_s"] / len(hooked) / p
    return f"""# Capture-hook overhead (CPU training step)

Command: `python -m benchmarks.bench_capture --rounds {args.rounds} --block {args.block} --batch {args.batch} --seq-len {args.seq_len}`

Model: `moesim capture-demo`'s Mixtral-style MoE (2 layers, 8 experts, top-2, hidden 64, byte vocabulary),
AdamW, batch {args.batch} x {args.seq_len} bytes of the Python stdlib source; forward + backward + optimizer step.
Blocks of {args.block} steps without and with `moesim.capture` alternate, {args.rounds} rounds, same process.
Machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, {torch.get_num_threads()} threads
(shared machine: timings are noisy).

| | median step (ms) | mean step (ms) |
|---|---|---|
| without hook | {p / MS:.2f} | {np.mean(plain) / MS:.2f} |
| with hook | {h / MS:.2f} | {np.mean(hooked) / MS:.2f} |
| overhead | {overhead * 100:+.2f} % | {mean_over * 100:+.2f} % |

Time the training thread spends inside the capture hooks (router hooks, step counting, batched host copy
and hand-off; timed directly, so unaffected by the machine's noise): {hook_ms:.3f} ms per step =
{hook_share * 100:.2f} % of the median plain step. The Parquet writing runs on the background thread.

Rows captured: {m['rows']}. Closing a capture (final flush + writer join + manifest), median: {np.median(m['close_s']) / MS:.1f} ms
(once per run, not per step). Target: overhead <= 5 %: {'met' if max(overhead, hook_share) <= 0.05 else 'NOT met'} (median step and in-hook time).
"""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    step, model, opt = _trainer(args)
    text_md = _markdown(args, _measure(args, step, model, opt))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text_md)
    print(text_md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
