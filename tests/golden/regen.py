"""The golden record of the demo run (the ``moesim simulate`` line of ``make demo``), regenerated only on purpose.

``tests/moesim/cli/test_demo_golden.py`` runs the demo's simulate command (read from the Makefile, so
the two cannot drift) and compares its key outputs with ``tests/golden/demo.json`` exactly (rel 1e-9).
When a change of the demo's numbers is intended -- a new default cost model, a corrected formula --
regenerate the file and commit it with the reason::

    .venv/bin/python -m tests.golden.regen

The record names the cost model it was made with, so that a change of the default cost model shows
as such in the test's failure and in the file's diff.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shlex
import tempfile
from pathlib import Path

from moebase.units import US

REPO = Path(__file__).resolve().parent.parent.parent
GOLDEN_PATH = Path(__file__).with_name("demo.json")
REGEN_COMMAND = ".venv/bin/python -m tests.golden.regen"
REL_TOL = 1e-9


def demo_argv(makefile: Path = REPO / "Makefile") -> list[str]:
    """The arguments of the Makefile's ``demo`` simulate line, from ``simulate`` on, without ``--out``."""
    for line in makefile.read_text().splitlines():
        words = shlex.split(line)
        if "moesim" in words and "simulate" in words:
            argv = words[words.index("simulate"):]
            if "--out" in argv:
                i = argv.index("--out")
                del argv[i:i + 2]
            return argv
    raise ValueError(f"{makefile}: no 'moesim simulate' line in the demo target")


def demo_record(out_dir: str | Path) -> dict:
    """Run the demo's simulate command into ``out_dir`` and return its key outputs."""
    import pandas as pd

    from moesim.cli import main

    argv = demo_argv()
    with contextlib.redirect_stdout(io.StringIO()):
        rc = main([*argv, "--out", str(out_dir)])
    if rc != 0:
        raise RuntimeError(f"moesim {' '.join(argv)} exited with {rc}")
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    ops = pd.read_parquet(Path(out_dir) / "ops.parquet")
    busy = ops.assign(busy_s=ops["end_at_s"] - ops["start_at_s"]).groupby("op")
    per_op = {op: {"rows": int(len(g)), "busy_s": float(g["busy_s"].sum()), "flops": float(g["flops"].sum()),
                   "bytes": float(g["bytes"].sum())} for op, g in busy}
    keys = ("cost_model", "system", "device", "model", "num_tokens", "num_layers", "micro_batches", "dtype",
            "replica_routing", "tokens_routed", "total_time_s", "layer_time_s")
    return {"command": f"moesim {' '.join(argv)}", **{k: summary[k] for k in keys}, "ops": per_op}


def differences(golden: dict, got: dict, path: str = "") -> list[str]:
    """Where ``got`` differs from ``golden``: numbers beyond REL_TOL, anything else exactly."""
    if isinstance(golden, dict) and isinstance(got, dict):
        out = [f"{path}{k}: missing in the run" for k in golden if k not in got]
        out += [f"{path}{k}: not in the golden file" for k in got if k not in golden]
        for k in golden.keys() & got.keys():
            out += differences(golden[k], got[k], f"{path}{k}.")
        return out
    if isinstance(golden, list) and isinstance(got, list) and len(golden) == len(got):
        return [d for i, (a, b) in enumerate(zip(golden, got)) for d in differences(a, b, f"{path}{i}.")]
    numbers = (int, float)
    if isinstance(golden, numbers) and isinstance(got, numbers) and not isinstance(golden, bool):
        same = math.isclose(golden, got, rel_tol=REL_TOL, abs_tol=0.0)
    else:
        same = golden == got
    return [] if same else [f"{path.rstrip('.')}: golden {golden!r}, now {got!r}"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        record = demo_record(tmp)
    GOLDEN_PATH.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_PATH.relative_to(REPO)}: {record['command']}, cost model {record['cost_model']!r}, "
          f"simulated time {record['total_time_s'] / US:.1f} us")


if __name__ == "__main__":
    main()
