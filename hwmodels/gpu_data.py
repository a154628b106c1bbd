"""Readers for the public GPU timing data sets used to fit and validate the GPU cost models.

The data live outside the package (``../shared/data/gpu-timings`` beside a checkout; see its README for
provenance and licences) and are needed only to **re-fit** or **validate**: the fitted parameters ship in
``hwmodels/gpu_fits/``. Every reader takes the data directory and raises ``ValueError`` naming the file when
it is missing, too large or malformed.

* :func:`vidur_gemms`: Vidur's per-operator fp16 kernel times of the four projection GEMMs of three dense
  models (microsoft/vidur, MIT), one row per (model, op, num_tokens, tp) with m, n, k and the median time.
* :func:`vidur_collectives`: Vidur's NCCL all-reduce / send-recv times inside a DGX node.
* :func:`llmcompass_matmuls`: LLMCompass's A100 fp16 matmul sweep (PrincetonUniversity/LLMCompass, BSD-3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moebase.files import checked_size
from moebase.units import MB, MS

MAX_FILE_BYTES = 64 * MB
"""Largest data file a reader opens (the shipped ones are < 1 MB)."""
VIDUR_GPUS = ("h100", "a100")
VIDUR_SYSTEMS = ("h100_dgx", "a100_dgx")
GEMM_COLUMNS = ["model", "op", "m", "n", "k", "tp", "time_s"]


def default_data_dir(repo_root: Path) -> Path:
    """Where CI and developers keep the shared data: ``<repo>/../shared/data/gpu-timings``."""
    return Path(repo_root).resolve().parent / "shared" / "data" / "gpu-timings"


def _read_csv(path: Path, **kw) -> pd.DataFrame:
    checked_size(path, MAX_FILE_BYTES, "timing table", hint="see ../shared/data/gpu-timings/README.md")
    try:
        return pd.read_csv(path, **kw)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable CSV table: {exc}") from None


def _gemm_shapes(row) -> list[tuple[str, float, float]]:
    """(op, n, k) of the four projection GEMMs of one Vidur row (see the data README's table)."""
    h, i, tp = float(row["n_embd"]), float(row["n_expanded_embd"]), float(row["num_tensor_parallel_workers"])
    gated = str(row["use_gated_mlp"]).strip().lower() in ("true", "1")
    qkv = (row["n_head"] + 2 * row["n_kv_head"]) * h / row["n_head"] / tp
    return [("mlp_up_proj", (2 if gated else 1) * i / tp, h), ("mlp_down_proj", h, i / tp),
            ("attn_pre_proj", qkv, h), ("attn_post_proj", h, h / tp)]


def vidur_gemms(data_dir: str | Path, gpu: str) -> pd.DataFrame:
    """Vidur's projection-GEMM kernel times on ``gpu`` (``h100`` | ``a100``), fp16.

    Columns: model, op, m (num_tokens), n, k, tp, time_s (median of 20 measured steps, seconds).
    """
    if gpu not in VIDUR_GPUS:
        raise ValueError(f"unknown Vidur GPU {gpu!r}; known: {', '.join(VIDUR_GPUS)}")
    folder = Path(data_dir) / "vidur" / "compute" / gpu
    files = sorted(folder.glob("*.mlp.csv.gz"))
    if not files:
        raise ValueError(f"{folder}: no Vidur compute tables (*.mlp.csv.gz)")
    out = []
    for path in files:
        df = _read_csv(path)
        model = path.name.split(".mlp")[0]
        for row in df.to_dict("records"):
            for op, n, k in _gemm_shapes(row):
                out.append((model, op, float(row["num_tokens"]), n, k, int(row["num_tensor_parallel_workers"]),
                            float(row[f"time_stats.{op}.median"]) * MS))
    res = pd.DataFrame(out, columns=GEMM_COLUMNS)
    bad = ~np.isfinite(res["time_s"]) | (res["time_s"] <= 0)
    return res[~bad].reset_index(drop=True)


def vidur_collectives(data_dir: str | Path, system: str, kind: str) -> pd.DataFrame:
    """Vidur's NCCL times in one DGX node: ``system`` ``h100_dgx`` | ``a100_dgx``, ``kind`` ``all_reduce`` |
    ``send_recv``. Columns: size_bytes (fp16 message), num_workers, devices_per_node (GPUs used per node), nodes,
    time_s (median of 3 steps, s). ``nodes > 1`` rows cross the inter-node network."""
    if system not in VIDUR_SYSTEMS or kind not in ("all_reduce", "send_recv"):
        raise ValueError(f"unknown Vidur collective {system}/{kind}; systems {VIDUR_SYSTEMS}, "
                         "kinds all_reduce, send_recv")
    df = _read_csv(Path(data_dir) / "vidur" / "network" / system / f"{kind}.csv.gz")
    res = pd.DataFrame({"size_bytes": df["size"].astype(float), "num_workers": df["num_workers"].astype(int),
                        "devices_per_node": df["devices_per_node"].astype(int),
                        "time_s": df[f"time_stats.{kind}.median"].astype(float) * MS})
    res["nodes"] = np.ceil(res["num_workers"] / res["devices_per_node"]).astype(int)
    return res[np.isfinite(res["time_s"]) & (res["time_s"] > 0)].reset_index(drop=True)


def llmcompass_matmuls(data_dir: str | Path) -> pd.DataFrame:
    """LLMCompass's A100 matmul sweep: columns m, n, k, time_s."""
    path = Path(data_dir) / "llmcompass" / "matmul_A100.csv"
    df = _read_csv(path, header=None, names=["m", "n", "k", "time", "throughput"], skipinitialspace=True)
    try:
        t = df["time"].astype(str).str.strip().str.removesuffix("ms").astype(float) * MS
    except ValueError as exc:
        raise ValueError(f"{path}: column 4 must be times like '0.19ms': {exc}") from None
    return pd.DataFrame({"m": df["m"].astype(float), "n": df["n"].astype(float), "k": df["k"].astype(float),
                         "time_s": t})
