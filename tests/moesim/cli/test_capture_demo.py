"""A short `moesim capture-demo`: real text (stdlib sources), real training, traces valid, routing changed."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from moesim.cli.capture import run_demo  # noqa: E402
from workloads.importers import load_trace  # noqa: E402
from workloads.trace import validate  # noqa: E402


def test_capture_demo_short(tmp_path):
    s = run_demo(tmp_path / "demo", seconds=20, max_steps=12, batch=4, seq_len=32, accum=2, gen_tokens=4, seed=0)
    train = load_trace(tmp_path / "demo" / "train")
    gen = load_trace(tmp_path / "demo" / "generate")
    validate(train)
    validate(gen)
    assert train.num_steps == s["steps"] and s["steps"] >= 4
    assert train.tokens_per_step()[0] == 2 * 4 * 32  # accum x batch x seq_len tokens per step
    assert set(np.unique(train.columns["token_id"])) <= set(range(256))
    assert s["loss_last"] < s["loss_first"]  # it learned something
    assert gen.num_steps == 1 + 3  # prefill + 3 decode steps (the 4th token comes from the last logits)
    # routing changed during training: the load moved between the first and last quarter of steps
    assert max(s["load_tvd_early_late"]) > 0.1
    assert np.all(np.isfinite(s["specialisation_late_bits"]))
