"""Traffic for studies: routing traces built from the real FLAME-MoE-290M trace, or from an expert-load
table (``table:<table>``, e.g. the DeepSeek-V3 serving loads; see :func:`load_table_traffic`).

``TRAFFIC`` names a function ``(model, tokens, steps, seed) -> Trace``:

- ``flame``: the real FLAME-MoE-290M trace (2048 tokens x 8 MoE layers x top-6 of 64 experts),
  tiled to ``tokens`` tokens per step (copy c of the 2048-token stream is rotated by ``c * 331``
  tokens so tiles do not line up); the model must have 64 experts, top-6 and >= 8 MoE layers.
- ``flame-remapped``: FLAME routing remapped to the model's shape (e.g. DeepSeek-V3: 256 experts,
  top-8, 58 MoE layers). Documented remapping, deterministic given ``seed``:

  * layer l of the model uses FLAME layer ``l % 8``; its 64 expert ids are permuted by a seeded
    permutation drawn per model layer (real models' hot experts differ between layers);
  * each FLAME expert e is split into ``s = E / 64`` fine-grained experts ``s*e .. s*e+s-1``
    (DeepSeek-style fine-grained experts); a choice of e goes to sub-expert ``(token_id + l) % s``
    (token identity decides, so a token's choices stay consistent across its tiles);
  * top-k > 6: the extra ranks take the FLAME top-ranked experts again with the next sub-expert
    index ``(token_id + l + 1 + j // 6) % s``, which keeps the experts of a token distinct;
    top-k < 6 keeps the first k ranks.

  The per-layer expert-load skew of FLAME therefore carries over (each expert's load is shared by
  its s fine-grained children), as does the token-level co-activation structure.

Source of the FLAME data: CMU-FLAME/FLAME-MoE-Traces (Apache-2.0), see ``workloads/importers.py``
and ``shared/data/traces/README.md``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from workloads.catalog import MoEModel
from workloads.trace import Trace, TraceMeta, from_dense

FLAME_TOKENS = 2048
ROTATE_TOKENS = 331  # rotation between tiles of the 2048-token stream (prime, so tiles do not align)


def _flame_dense():
    from workloads.importers import load_trace

    tr = load_trace("default")
    e, w = tr.dense()  # [2048, 8, 6]
    token_id = tr.columns["token_id"][(tr.columns["layer"] == 0) & (tr.columns["rank"] == 0)] if "token_id" in tr.columns \
        else np.arange(e.shape[0])
    return tr, e, w, np.asarray(token_id, dtype=np.int64)


def _tile_index(tokens: int, steps: int) -> np.ndarray:
    """[steps * tokens] index into the 2048 FLAME tokens."""
    n = tokens * steps
    i = np.arange(n, dtype=np.int64)
    copy = i // FLAME_TOKENS
    return (i + copy * ROTATE_TOKENS) % FLAME_TOKENS


def flame(model: MoEModel, tokens: int, steps: int, seed: int) -> Trace:
    base, e, w, _ = _flame_dense()
    m = base.meta
    if model.num_experts != m.num_experts or model.num_experts_per_tok != m.top_k:
        raise ValueError(f"traffic 'flame' is FLAME-MoE routing ({m.num_experts} experts, top-{m.top_k}); model "
                         f"{model.name!r} has {model.num_experts} experts, top-{model.num_experts_per_tok}: "
                         f"use traffic = 'flame-remapped'")
    idx = _tile_index(tokens, steps)
    step = np.repeat(np.arange(steps, dtype=np.int32), tokens)
    tok = np.tile(np.arange(tokens, dtype=np.int64), steps)
    meta = TraceMeta(model=m.model, num_experts=m.num_experts, top_k=m.top_k, num_layers=m.num_layers,
                     source=f"{m.source}; tiled to {tokens} tokens x {steps} steps (moesim.study.traffic.flame)")
    return from_dense(e[idx], w[idx], meta, step=step, token=tok)


def flame_remapped(model: MoEModel, tokens: int, steps: int, seed: int) -> Trace:
    base, e, w, token_id = _flame_dense()
    fe = base.meta.num_experts
    E, k, L = model.num_experts, model.num_experts_per_tok, model.num_moe_layers
    if E % fe:
        raise ValueError(f"traffic 'flame-remapped' splits each of FLAME's {fe} experts into E/{fe} experts; "
                         f"model {model.name!r} has {E} experts, not a multiple of {fe}")
    s = E // fe
    if k > 6 * s:
        raise ValueError(f"traffic 'flame-remapped' cannot make top-{k} distinct choices from {fe} x {s} experts")
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(fe) for _ in range(L)])  # [L, 64]
    idx = _tile_index(tokens, steps)
    n = len(idx)
    out = np.empty((n, L, k), dtype=np.int32)
    wout = np.empty((n, L, k), dtype=np.float32)
    tid = token_id[idx]
    for layer in range(L):
        src = e[idx, layer % base.meta.num_layers, :]  # [n, 6]
        src_w = w[idx, layer % base.meta.num_layers, :]
        mapped = perms[layer][src]
        for j in range(k):
            r, extra = j % 6, j // 6
            sub = (tid + layer + extra) % s
            out[:, layer, j] = mapped[:, r] * s + sub
            wout[:, layer, j] = src_w[:, r] / (1 + extra)
    step = np.repeat(np.arange(steps, dtype=np.int32), tokens)
    tok = np.tile(np.arange(tokens, dtype=np.int64), steps)
    meta = TraceMeta(model=model.name, num_experts=E, top_k=k, num_layers=L,
                     source=f"FLAME-MoE-290M routing remapped to {model.name} shape (moesim.study.traffic.flame_remapped, "
                            f"seed {seed}); {base.meta.source}")
    return from_dense(out, wout, meta, step=step, token=tok)


TABLE_PREFIX = "table:"  # traffic = "table:<load table>": see load_table_traffic


def load_table_traffic(spec: str, model: MoEModel, tokens: int, steps: int, seed: int) -> Trace:
    """``table:<load table>``: an expert-load table (``workloads.load_table``; a path, or a name under
    shared/data/traces such as ``deepseek-v3-expert-loads/prefill_in4096``) expanded to ``tokens`` tokens x
    ``steps`` steps with ``seed``: every step's per-layer expert loads equal the table (apportioned to
    ``tokens``), layers independent. The table must have the model's experts, top-k and MoE layers."""
    from workloads.importers import load_table_spec
    from workloads.load_table import expand, read_load_table

    name = spec[len(TABLE_PREFIX):]
    path, opts = load_table_spec(name)
    if path is None or opts:
        raise ValueError(f"traffic {spec!r}: {name!r} is not an expert-load table (a path, or a name under "
                         f"shared/data/traces such as 'deepseek-v3-expert-loads/prefill_in4096'; no ':' options)")
    table = read_load_table(path, top_k=model.num_experts_per_tok)
    if (table.num_experts, table.moe_layers) != (model.num_experts, tuple(model.moe_layers)):
        raise ValueError(f"traffic {spec!r}: the table has {table.num_experts} experts in layers "
                         f"{table.moe_layers[0]}..{table.moe_layers[-1]}, model {model.name!r} {model.num_experts} "
                         f"experts in layers {model.moe_layers[0]}..{model.moe_layers[-1]}")
    return expand(table, tokens, steps=steps, seed=seed)


def drill_tokens(name: str, device_tokens: np.ndarray, devices_per_node: int) -> np.ndarray:
    """The study's drill-down of choices computed [layers, devices]; for load-table traffic summed per node
    [layers, nodes]: with one expert per GPU the per-device counts would be the (unlicensed) table itself."""
    if not name.startswith(TABLE_PREFIX):
        return device_tokens
    layers, devices = device_tokens.shape
    return device_tokens.reshape(layers, devices // devices_per_node, devices_per_node).sum(axis=2)


TRAFFIC: dict[str, Callable[[MoEModel, int, int, int], Trace]] = {
    "flame": flame,
    "flame-remapped": flame_remapped,
}


def make_traffic(name: str, model: MoEModel, tokens: int, steps: int, seed: int) -> Trace:
    if name.startswith(TABLE_PREFIX):
        return load_table_traffic(name, model, tokens, steps, seed)
    if name not in TRAFFIC:
        raise ValueError(f"unknown traffic {name!r}; known: {', '.join(sorted(TRAFFIC))}, or "
                         f"'{TABLE_PREFIX}<expert-load table>'")
    return TRAFFIC[name](model, tokens, steps, seed)
