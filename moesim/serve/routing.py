"""Per-request routing from a captured trace: each request's tokens take consecutive token rows of the trace.

The trace's tokens, in (step, token) order, form ``N`` rows of ``[layers, top_k]`` expert ids. Request ``r`` draws a
start row ``s_r`` (uniform over ``N``, from the seed) and its token at position ``p`` (prompt and generated
tokens alike: position ``p`` of the sequence) routes as trace row ``(s_r + p) mod N``. So a request's
consecutive tokens keep the trace's sequence (and its inter-layer pattern), and an iteration's expert loads
change as the requests in the batch change. :meth:`RequestRouting.rows` gives the rows of an iteration's
tokens, :meth:`RequestRouting.loads` their per-layer expert loads (one ``bincount``), :meth:`RequestRouting.trace`
the one-step trace of those rows that the training engine's MoE phases replay
(:meth:`moesim.serve.cost.IterationCost.rank_s`).

The rows come from a captured trace or from the trace-fitted generator of ``moesim train --routing synthetic``
(:func:`synthetic_rows_trace`: :func:`moesim.train.routing.synthetic_trace`, the generator of
:mod:`workloads.synth` fitted to a source trace, in the served model's shape).
"""

from __future__ import annotations

import numpy as np

from workloads.load_table import dense_trace  # from_dense without its sort (tested equal there)
from workloads.trace import Trace

MAX_ROWS = 50_000_000  # (token, layer, rank) choices held densely at most


class RequestRouting:
    """Routing rows of a dense trace (every token has ``top_k`` experts in every layer) for requests; ``seed``
    draws each request's start row."""

    def __init__(self, trace: Trace, seed: int = 0):
        m = trace.meta
        c = trace.columns
        if len(trace) > MAX_ROWS:
            raise ValueError(f"--trace has {len(trace)} rows, over the {MAX_ROWS} per-request routing holds")
        steps, step_idx = np.unique(c["step"], return_inverse=True)
        per_step = int(c["token"].max(initial=0)) + 1
        n = len(steps) * per_step
        if len(trace) != n * m.num_layers * m.top_k:
            raise ValueError(f"--trace {m.source!r} is not dense ({len(trace)} rows, not tokens x layers x top-k = "
                             f"{n} x {m.num_layers} x {m.top_k}): per-request routing needs every token in every layer")
        ids = np.full((n, m.num_layers, m.top_k), -1, dtype=np.int32)
        ids[step_idx.ravel() * per_step + c["token"].astype(np.int64), c["layer"], c["rank"]] = c["expert"]
        if ids.min() < 0:
            raise ValueError(f"--trace {m.source!r}: some token misses a layer or a rank; per-request routing needs "
                             "a dense trace")
        self.ids, self.meta, self.seed = ids, m, seed
        self.starts = np.zeros(0, dtype=np.int64)

    @property
    def num_rows(self) -> int:
        return self.ids.shape[0]

    def bind(self, num_requests: int) -> None:
        """Draw the start rows of requests ``0 .. num_requests - 1`` (seeded; the same for every replica)."""
        self.starts = np.random.default_rng(self.seed).integers(0, self.num_rows, size=num_requests)

    def rows(self, ids: np.ndarray, context: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Trace rows of the tokens of requests ``ids`` at positions ``context .. context + tokens - 1`` each."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if not tokens.size or int(tokens.sum()) == 0:
            return np.zeros(0, dtype=np.int64)
        first = self.starts[np.asarray(ids)] + np.asarray(context, dtype=np.int64)
        ends = np.cumsum(tokens)
        within = np.arange(int(ends[-1])) - np.repeat(ends - tokens, tokens)
        return (np.repeat(first, tokens) + within) % self.num_rows

    def loads(self, rows: np.ndarray) -> np.ndarray:
        """Expert loads [layers, experts] of the tokens at trace ``rows``: (token, expert) choices per expert."""
        layers, e = self.meta.num_layers, self.meta.num_experts
        key = (np.arange(layers, dtype=np.int64)[None, :, None] * e + self.ids[rows]).ravel()
        return np.bincount(key, minlength=layers * e).reshape(layers, e)

    def trace(self, rows: np.ndarray) -> Trace:
        """One step of the tokens at ``rows`` (in that order), for the MoE phases to replay."""
        return dense_trace(self.ids[rows], 1, len(rows), self.meta)


def synthetic_rows_trace(cfg, source: Trace, tokens: int, seed: int = 0) -> Trace:
    """A dense one-step trace of ``tokens`` tokens drawn from the routing generator fitted to ``source``, in
    ``cfg``'s shape (its routed experts and top-k, ``min(fitted layers, MoE layers)`` layers; sequences of the
    fitted length), by the training step's :func:`moesim.train.routing.synthetic_trace` (one sample, one device's
    window of ``tokens``). ValueError naming the flags when it cannot."""
    from moesim.train.routing import synthetic_trace
    from moesim.train.spec import Parallel, TrainError, TrainSpec

    if tokens < 1 or tokens > MAX_ROWS:
        raise ValueError(f"--synth-tokens must lie in 1..{MAX_ROWS}, got {tokens}")
    try:
        spec = TrainSpec(parallel=Parallel(tp=1, pp=1, dp=1, ep=1), seq_len=tokens, micro_batch_size=1,
                         global_batch_size=1, routing="synthetic", routing_samples=1)
        return synthetic_trace(cfg, spec, source, seed=seed, tokens_per_sample=tokens)
    except TrainError as exc:
        raise ValueError(f"--request-routing synthetic --synth-from {source.meta.model!r}: {exc}") from None

