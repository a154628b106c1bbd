"""MoE model catalog: shapes of the models moesim knows, with sources (Hugging Face config names)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from moebase.units import DEFAULT_DTYPE, DTYPE_BYTES

CATALOG_PATH = Path(__file__).parent / "catalog.toml"

_FIELDS = {"hf_id", "hidden_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok", "num_shared_experts",
           "shared_expert_intermediate_size", "num_layers", "moe_layers", "source"}


def swiglu_params(hidden_size: int, intermediate_size: int) -> int:
    """Parameters of one SwiGLU FFN (an expert, a shared expert or a dense FFN): gate, up and down
    projections, each ``hidden_size x intermediate_size``."""
    return 3 * hidden_size * intermediate_size


@dataclass(frozen=True)
class MoEModel:
    """Shapes of an MoE transformer; only what the simulator needs."""

    name: str
    hf_id: str
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    shared_expert_intermediate_size: int
    num_layers: int
    moe_layers: tuple[int, ...]
    source: str

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    def expert_weight_bytes(self, dtype_bytes: int = DTYPE_BYTES[DEFAULT_DTYPE]) -> int:
        """Bytes of one routed expert's SwiGLU weights (gate, up, down)."""
        return swiglu_params(self.hidden_size, self.moe_intermediate_size) * dtype_bytes

    def with_overrides(self, **kw) -> "MoEModel":
        import dataclasses
        return dataclasses.replace(self, **kw)


def _parse_layers(spec: str, where: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    if not out or len(set(out)) != len(out):
        raise ValueError(f"{where}: moe_layers {spec!r} must list distinct layer indices")
    return tuple(out)


def load_catalog(path: Path = CATALOG_PATH) -> dict[str, MoEModel]:
    with open(path, "rb") as fh:
        raw = tomllib.load(fh)
    models = {}
    for name, table in raw.get("models", {}).items():
        where = f"{path}: models.{name}"
        unknown = set(table) - _FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        missing = _FIELDS - set(table)
        if missing:
            raise ValueError(f"{where}: missing key {sorted(missing)[0]!r}")
        ints = {k: table[k] for k in _FIELDS - {"hf_id", "source", "moe_layers"}}
        for k, v in ints.items():
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}: key {k!r} must be a non-negative integer, got {v!r}")
        models[name] = MoEModel(name=name, hf_id=table["hf_id"], source=table["source"],
                                moe_layers=_parse_layers(table["moe_layers"], where), **ints)
    return models


def get_model(name: str) -> MoEModel:
    catalog = load_catalog()
    if name not in catalog:
        from moebase.names import unknown_name
        raise ValueError(unknown_name("model", name, catalog))
    return catalog[name]
