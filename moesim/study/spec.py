"""``study.toml``: a grid or a list of configurations over hardware, model, placement, memory and policies.

Format::

    [study]
    name = "placement_vs_scale"          # optional, default: the folder name
    description = "..."                  # optional
    engine = "analytic"                  # "analytic" (default), "des", "memory" (MEMORY_PARAMETERS) or "train" (TRAIN_PARAMETERS)
    seed = 0                             # one seed for every configuration (results do not depend on the executor)

    [base]                               # values shared by every configuration (override PARAMETERS defaults)
    model = "deepseek-v3"

    [grid]                               # Cartesian product of these lists ...
    nodes = [1, 2, 4]
    placement = ["contiguous", "round-robin"]

    [[configs]]                          # ... and/or an explicit list of configurations
    nodes = 8

Every configuration is ``PARAMETERS`` defaults <- ``[base]`` <- one grid point / list entry. An unknown
key anywhere, a grid key with an empty list, or a study with neither grid nor list raises ValueError
naming the file and the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moebase.units import DEFAULT_DTYPE

#: every parameter a configuration has, with its default and type
PARAMETERS: dict[str, Any] = {
    "system": "dgx-h100",          # system spec name or .toml path
    "nodes": 1,                    # scale the system to this many nodes
    "model": "flame-moe-290m",     # model catalog name
    "traffic": "flame",            # see moesim.study.traffic.TRAFFIC
    "tokens": 2048,                # tokens per step of the traffic
    "steps": 1,                    # steps of the traffic
    "placement": "contiguous",     # a name of moesim.place.METHODS (or ALIASES)
    "replicas": 0,                 # redundant expert slots in total (placement methods that replicate)
    "replica_routing": "local-first",
    "micro_batches": 1,
    "overlap_micro_batches": True,
    "dtype": DEFAULT_DTYPE,
    "cost": "default",             # default (the device's, as `moesim simulate`) | a name of hwmodels.cost.cost_names()
    "hbm_capacity_bytes": 0.0,     # 0 = the device spec's HBM (main memory) capacity
    "sram_capacity_bytes": 0.0,    # 0 = the device spec's SRAM tier (0 if none)
    "cache_policy": "lru",         # expert-cache policy of HBM (and SRAM): a key of moesim.memory.cache.CACHE_POLICIES
    "memory_steps": 3,             # steps of traffic replayed through the expert cache (step 0 warms it up)
}
#: parameters of an ``engine = "memory"`` study: expert offloading on one device that holds every
#: expert, replayed on a routing trace (moesim.memory.evaluator.evaluate; no placement, no network)
MEMORY_PARAMETERS: dict[str, Any] = {
    "system": "sn40l-node",
    "model": "olmoe-1b-7b",        # catalog model for expert shapes (as many experts per layer as the trace)
    "trace": "default",            # routing trace: a name or path of workloads.importers.load_trace
    "tokens": 256,                 # first tokens of the trace replayed
    "batch_tokens": 1,             # tokens per batch (a batch fetches each of its experts once)
    "dtype": DEFAULT_DTYPE,
    "cache_policy": "lru",         # a key of moesim.memory.cache.CACHE_POLICIES
    "prefetch_lookahead": 1,       # layers ahead a prefetching policy predicts
    "prefetch_accuracy": 1.0,      # pregate: probability that each expert is predicted right
    "hbm_capacity_bytes": 0.0,     # 0 = the spec's cache tier (main memory)
    "hbm_bandwidth_bytes_per_s": 0.0,
    "sram_capacity_bytes": 0.0,    # 0 = the spec's SRAM (stream) tier, if any
    "backing_bandwidth_bytes_per_s": 0.0,  # 0 = the spec's backing tier (DDR on SN40L, host memory on a GPU)
    "overlap_transfers": True,     # fetches overlap with compute
}
#: parameters of an ``engine = "train"`` study: one training step of a whole model (moesim.study.train)
TRAIN_PARAMETERS: dict[str, Any] = {
    "system": "hgx-h800",
    "nodes": 256,
    "model": "deepseek-v3",        # shipped config name or config.json path (workloads.hf_config)
    "layers": 0,                   # 0 = every block of the model, else the first K
    "tp": 1, "pp": 16, "ep": 64, "zero": 1, "virtual_stages": 1,
    "schedule": "dualpipe", "recompute": "selective", "dtype": "fp8",
    "seq_len": 4096, "micro_batch_size": 1, "global_batch_size": 15360,
    "routing": "balanced",         # balanced | table:<SGLang table>[:options] | a trace spec
    "routing_samples": 4,
    "expert_mode": "ep",           # ep | fssdp
    "fssdp_plan": "oracle",        # oracle | first-sample (moesim.train.fssdp)
    "offload": "none",             # none | optimizer | weights (moesim.train.offload)
    "cost": "default",             # default (the device's) | roofline | gpu-fitted
    "comm_sms": 0,                 # SMs the overlapped all-to-all holds (0: none)
    "cp": 1, "etp": 1,             # context parallel; expert tensor parallel (moesim.train.spec.Parallel)
    "dispatch_dedup": "auto",      # auto | none | gpu | node (moesim train --dispatch-dedup)
    "overlap_grad_reduce": False, "overlap_param_gather": False, "tp_comm_overlap": False,  # moesim.train.overlap
    "fp8_recipe": "delayed",       # delayed | tensorwise | blockwise | none (moesim.train.fp8)
    "host_overhead": "eager",      # eager | cuda-graphs | none (moesim.train.host)
}
NONNEGATIVE_INT_KEYS = {"replicas", "layers", "comm_sms", "zero"}
STUDY_KEYS = {"name", "description", "engine", "seed"}
TOP_KEYS = {"study", "base", "grid", "configs"}
#: the parameters of a configuration, by the study's engine
ENGINE_PARAMETERS: dict[str, dict[str, Any]] = {"analytic": PARAMETERS, "des": PARAMETERS, "memory": MEMORY_PARAMETERS,
                                                 "train": TRAIN_PARAMETERS}
ENGINE_NAMES = tuple(ENGINE_PARAMETERS)


@dataclass(frozen=True)
class Study:
    """A parsed study: ``configs`` is a list of full parameter dicts (keys of PARAMETERS) in study order."""

    path: Path
    name: str
    description: str
    engine: str
    seed: int
    configs: tuple[dict, ...]
    varied: tuple[str, ...]  # parameters that take more than one value across configs

    @property
    def results_path(self) -> Path:
        return self.path / "results.parquet"


def config_id(config: dict, engine: str, seed: int) -> str:
    """A stable id of one configuration (hash of its parameters, engine and seed)."""
    doc = json.dumps({"config": config, "engine": engine, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha1(doc.encode()).hexdigest()[:16]


def _check_value(where: str, key: str, value: Any, params: dict[str, Any] = PARAMETERS) -> Any:
    if key not in params:
        raise ValueError(f"{where}: unknown key {key!r} (known parameters: {', '.join(sorted(params))})")
    default = params[key]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key in NONNEGATIVE_INT_KEYS else 1)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str) and value != ""
    if ok and key == "cost":
        _check_cost(where, value)
    if not ok:
        kind = {bool: "true/false", int: "a positive integer", float: "a non-negative number", str: "a non-empty string"}[type(default)]
        raise ValueError(f"{where}: key {key!r} must be {kind}, got {value!r}")
    return value


def _check_cost(where: str, name: str) -> None:
    from hwmodels.cost import cost_names

    if name not in cost_names():
        raise ValueError(f"{where}: key 'cost': unknown cost model {name!r} "
                         f"(known in studies: {', '.join(cost_names())})")


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no study file (a study is a folder with a study.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def load_study(path: str | Path) -> Study:
    """Parse ``<dir>/study.toml`` (``path`` is the folder or the file) into a :class:`Study`."""
    path = Path(path)
    file = path if path.suffix == ".toml" else path / "study.toml"
    folder = file.parent
    raw = _read(file)
    for key in raw:
        if key not in TOP_KEYS:
            raise ValueError(f"{file}: unknown key {key!r} (allowed tables: {', '.join(sorted(TOP_KEYS))})")
    head = raw.get("study", {})
    for key in head:
        if key not in STUDY_KEYS:
            raise ValueError(f"{file}: unknown key 'study.{key}' (known: {', '.join(sorted(STUDY_KEYS))})")
    engine = head.get("engine", "analytic")
    if engine not in ENGINE_NAMES:
        raise ValueError(f"{file}: key 'study.engine': unknown engine {engine!r} (known: {', '.join(ENGINE_NAMES)})")
    seed = head.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{file}: key 'study.seed' must be a non-negative integer, got {seed!r}")
    params = ENGINE_PARAMETERS[engine]
    base = dict(params)
    for key, value in raw.get("base", {}).items():
        base[key] = _check_value(f"{file}: [base]", key, value, params)
    points: list[dict] = []
    grid = raw.get("grid")
    if grid is not None:
        if not isinstance(grid, dict) or not grid:
            raise ValueError(f"{file}: [grid] is empty (give at least one parameter with a list of values)")
        axes = []
        for key, values in grid.items():
            if not isinstance(values, list):
                values = [values]
            if not values:
                raise ValueError(f"{file}: key 'grid.{key}' is an empty list, so the grid has no configurations")
            axes.append([(key, _check_value(f"{file}: [grid]", key, v, params)) for v in values])
        points += [dict(combo) for combo in itertools.product(*axes)]
    entries = raw.get("configs")
    if entries is not None:
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{file}: key 'configs' is empty (write [[configs]] tables)")
        for i, entry in enumerate(entries):
            points.append({k: _check_value(f"{file}: configs[{i}]", k, v, params) for k, v in entry.items()})
    if not points:
        raise ValueError(f"{file}: the study has no configurations: add a [grid] or [[configs]]")
    configs = []
    seen = set()
    for p in points:
        c = {**base, **p}
        cid = config_id(c, engine, seed)
        if cid not in seen:  # duplicates (e.g. a list entry equal to a grid point) run once
            seen.add(cid)
            configs.append(c)
    varied = tuple(k for k in params if len({json.dumps(c[k]) for c in configs}) > 1)
    return Study(path=folder, name=head.get("name", folder.name), description=head.get("description", ""),
                 engine=engine, seed=seed, configs=tuple(configs), varied=varied)
