"""Each routing policy's defining property, on Gaussian logits and on logits captured from a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from workloads import routing_policies as rp
from workloads.trace import validate

R = rp.synthetic_logits(num_tokens=64, num_layers=3, num_experts=8, seed=3, num_steps=2)


def _probs(r):
    z = np.exp(r.logits - r.logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _per_token(trace, col):
    key = (trace.step.astype(np.int64) * 1000 + trace.token) * 10 + trace.layer
    return key, trace.columns[col]


def test_topk_renormalised_and_raw():
    t = rp.topk(R, k=2)
    e, w = t.dense()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    p = _probs(R)
    ref = np.argsort(-p, axis=-1)[..., :2]
    np.testing.assert_array_equal(e, ref)
    raw = rp.topk(R, k=2, renormalize=False)
    _, w2 = raw.dense()
    np.testing.assert_allclose(w2, np.take_along_axis(p, ref, -1), rtol=1e-5)
    assert (w2.sum(-1) < 1).all()


@pytest.mark.parametrize("cf", [0.5, 1.0, 1.5])
def test_capacity_never_exceeded_and_drops_reported(cf):
    t = rp.capacity(R, k=2, capacity_factor=cf)
    cap = int(np.ceil(cf * 64 * 2 / 8))
    load = np.zeros((2, 3, 8), int)
    np.add.at(load, (t.step, t.layer, t.expert), 1)
    assert load.max() <= cap
    full = rp.topk(R, k=2)
    assert len(full) - len(t) == t.meta.extra["dropped_choices"]
    if cf == 0.5:
        assert t.meta.extra["dropped_choices"] > 0
    # kept choices are a subset of the unconstrained top-k; first choices win over second choices
    kept = set(zip(t.step.tolist(), t.layer.tolist(), t.token.tolist(), t.expert.tolist()))
    allc = set(zip(full.step.tolist(), full.layer.tolist(), full.token.tolist(), full.expert.tolist()))
    assert kept <= allc


def test_top_p_mass_reaches_p_minimally():
    p_target = 0.6
    t = rp.top_p(R, p=p_target)
    assert t.meta.extra["variable_k"]
    key, w = _per_token(t, "weight")
    uniq, inv = np.unique(key, return_inverse=True)
    mass = np.bincount(inv, weights=w.astype(np.float64))
    assert len(uniq) == 2 * 64 * 3  # every token keeps at least one expert
    assert (mass >= p_target - 1e-5).all()
    smallest = np.full(len(uniq), np.inf)
    np.minimum.at(smallest, inv, w.astype(np.float64))
    assert (mass - smallest < p_target + 1e-6).all()  # dropping the weakest would fall below p
    counts = np.bincount(inv)
    assert counts.min() >= 1 and counts.max() > counts.min()  # variable k


def test_null_experts_reduce_compute():
    t = rp.null_experts(R, k=2, num_null=2, null_logit=1.0)
    assert t.expert.max() < 8
    key, _ = _per_token(t, "expert")
    counts = np.bincount(np.unique(key, return_inverse=True)[1])
    assert len(t) < len(rp.topk(R, k=2)) and counts.max() <= 2
    # a very low null logit never wins: same as top-k
    never = rp.null_experts(R, k=2, num_null=2, null_logit=-1e9)
    np.testing.assert_array_equal(never.expert, rp.topk(R, k=2).expert)


def test_shared_experts_always_active():
    t = rp.shared_experts(R, k=2, num_shared=2)
    e, w = t.dense()
    assert t.meta.num_experts == 10 and t.meta.top_k == 4
    assert (e[..., 2] == 8).all() and (e[..., 3] == 9).all() and (w[..., 2:] == 1).all()
    assert (e[..., :2] < 8).all()


def test_expert_choice_balanced_load():
    t = rp.expert_choice(R, capacity_factor=2.0)
    cap = int(np.ceil(2.0 * 64 / 8))
    load = np.zeros((2, 3, 8), int)
    np.add.at(load, (t.step, t.layer, t.expert), 1)
    assert (load == cap).all()  # every expert takes exactly its capacity
    validate(t)
    p = _probs(R)
    # expert 0 in step 0, layer 1 took its top-cap tokens
    m = (t.step == 0) & (t.layer == 1) & (t.expert == 0)
    np.testing.assert_array_equal(np.sort(t.token[m]), np.sort(np.argsort(-p[:64, 1, 0])[:cap]))


def test_registry_and_bad_input():
    assert set(rp.ROUTING_POLICIES) == {"topk", "capacity", "top_p", "null_experts", "shared_experts",
                                        "expert_choice"}
    with pytest.raises(ValueError, match="unknown routing policy 'nope'"):
        rp.apply("nope", R)
    with pytest.raises(ValueError, match="p must be in"):
        rp.top_p(R, p=1.5)
    with pytest.raises(ValueError, match="k=9 must be in 1..num_experts=8"):
        rp.topk(R, k=9)


def test_policies_on_captured_logits(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from workloads.capture import capture

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    with capture(model, tmp_path / "c", record_logits=True):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 64, (2, 6)))
    r = rp.from_capture(tmp_path / "c")
    assert r.logits.shape == (12, 2, 8)
    from workloads.importers import load_trace

    recorded = load_trace(tmp_path / "c")
    np.testing.assert_array_equal(rp.topk(r, k=2).expert, recorded.expert)  # replaying the model's own policy
