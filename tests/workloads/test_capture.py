"""Capture hook: recorded routing equals the model's own decisions (HF Mixtral, OLMoE, Qwen2/3-MoE,
DeepSeek-V3), training / generation / gradient accumulation, crash safety and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")

from workloads.capture import Capture, capture, read_logits, read_manifest  # noqa: E402
from workloads.importers import load_trace  # noqa: E402
from workloads.trace import read_parquet  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _config(kind: str):
    if kind == "mixtral":
        return tf.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
    if kind == "olmoe":
        return tf.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                 shared_expert_intermediate_size=16, decoder_sparse_step=1)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16)
    if kind == "deepseek_v3":
        return tf.DeepseekV3Config(**COMMON, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                   n_group=4, topk_group=2, first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                                   qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, norm_topk_prob=True)
    raise AssertionError(kind)


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    m = tf.AutoModelForCausalLM.from_config(_config(kind))
    if kind == "deepseek_v3":
        # a non-zero correction bias: the choice then differs from top-k of the logits (group-limited + biased)
        for mod in m.modules():
            if type(mod).__name__ == "DeepseekV3TopkRouter":
                mod.e_score_correction_bias.copy_(torch.randn(8) * 0.5)
    return m


def _reference(kind: str, model, logits: np.ndarray, layer: int) -> np.ndarray:
    """The expert set per token computed here, independently, from the router logits [N, E]: softmax top-k,
    or DeepSeek-V3's sigmoid + bias, group-limited top-k (re-implemented in numpy)."""
    k = 2
    if kind != "deepseek_v3":
        return np.argsort(-logits, axis=1, kind="stable")[:, :k]
    gate = [m for m in model.modules() if type(m).__name__ == "DeepseekV3TopkRouter"][layer]
    bias = gate.e_score_correction_bias.detach().numpy()
    s = 1 / (1 + np.exp(-logits.astype(np.float64))) + bias
    grouped = s.reshape(len(s), 4, 2)
    gscore = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
    top_groups = np.argsort(-gscore, axis=1)[:, :2]
    mask = np.zeros((len(s), 4), dtype=bool)
    np.put_along_axis(mask, top_groups, True, axis=1)
    s = np.where(np.repeat(mask, 2, axis=1), s, -np.inf)
    return np.argsort(-s, axis=1)[:, :k]


@pytest.mark.parametrize("kind", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_recorded_experts_equal_model_routing(kind, tmp_path):
    model = _model(kind)
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    with capture(model, tmp_path / "run", record_token_ids=True) as cap:
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    assert cap.error is None
    trace = load_trace(tmp_path / "run")
    assert trace.meta.num_layers == 2 and trace.meta.num_experts == 8 and trace.meta.top_k == 2
    experts, weights = trace.dense()
    assert experts.shape == (21, 2, 2)
    first = (trace.columns["layer"] == 0) & (trace.columns["rank"] == 0)  # one row per token
    np.testing.assert_array_equal(trace.columns["token_id"][first], ids.numpy().ravel())
    for layer in range(2):
        logits = out.router_logits[layer].detach().float().numpy()
        ref = _reference(kind, model, logits, layer)
        got = experts[:, layer]
        if kind == "deepseek_v3":  # torch.topk(sorted=False): compare as sets
            np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(ref, axis=1))
            # and the bias matters: plain top-k of the logits differs for some tokens
            assert (np.sort(got, axis=1) != np.sort(np.argsort(-logits, axis=1)[:, :2], axis=1)).any()
        else:
            np.testing.assert_array_equal(got, ref)
    # positions and sequences follow the [batch, seq] layout
    seq = trace.columns["sequence"][first]
    pos = trace.columns["position"][first]
    np.testing.assert_array_equal(seq, np.repeat(np.arange(3), 7))
    np.testing.assert_array_equal(pos, np.tile(np.arange(7), 3))


def test_weights_match_gate_output_and_logits_recorded(tmp_path):
    model = _model("mixtral")
    ids = torch.randint(3, 64, (2, 5))
    with capture(model, tmp_path / "r", record_logits=True):
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
    trace = load_trace(tmp_path / "r")
    _, w = trace.dense()
    lg = read_logits(tmp_path / "r")
    assert lg["logits"].shape == (20, 8)
    for layer in range(2):
        ref = out.router_logits[layer].numpy()
        np.testing.assert_allclose(lg["logits"][lg["layer"] == layer], ref, rtol=1e-6)
        p = np.exp(ref - ref.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        top = np.sort(p, axis=1)[:, ::-1][:, :2]
        np.testing.assert_allclose(w[:, layer], top / top.sum(1, keepdims=True), rtol=1e-5)


def test_training_loop_with_gradient_accumulation(tmp_path):
    model = _model("olmoe")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    with capture(model, tmp_path / "t", optimizer=opt, flush_tokens=16, shard_rows=50) as cap:
        for _ in range(3):  # 3 optimizer steps x 2 micro-batches of [2, 6] tokens
            for _ in range(2):
                ids = torch.randint(3, 64, (2, 6), generator=gen)
                loss = model(input_ids=ids, labels=ids).loss / 2
                loss.backward()
            opt.step()
            opt.zero_grad()
    assert cap.error is None and cap.mode == "optimizer"
    man = read_manifest(tmp_path / "t")
    assert man["status"] == "complete" and len(man["shards"]) > 1
    trace = load_trace(tmp_path / "t")
    assert trace.tokens_per_step() == {0: 24, 1: 24, 2: 24}
    assert set(np.unique(trace.columns["microbatch"])) == {0, 1}
    assert np.unique(trace.columns["sequence"][trace.columns["step"] == 0]).tolist() == [0, 1, 2, 3]
    assert len(trace) == 3 * 24 * 2 * 2  # steps x tokens x layers x top_k (backward adds nothing)


def test_generation_forward_steps(tmp_path):
    model = _model("qwen3_moe")
    ids = torch.randint(3, 64, (2, 4))
    with capture(model, tmp_path / "g"):
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    trace = load_trace(tmp_path / "g")
    tps = trace.tokens_per_step()
    assert tps[0] == 8  # prefill: 2 sequences x 4 tokens
    assert all(tps[s] == 2 for s in tps if s > 0) and len(tps) == out.shape[1] - 4
    # decode positions continue after the prompt
    last = trace.select(trace.columns["step"] == max(tps))
    assert set(last.columns["position"].tolist()) == {4 + len(tps) - 2}


def test_manual_steps_and_custom_router(tmp_path):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = torch.nn.Linear(4, 6)

        def forward(self, x):
            logits = self.router(x)
            return x + logits.topk(2, dim=-1).values.sum(-1, keepdim=True)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block() for _ in range(3)])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()

    def adapter(module, inputs, output):
        top = output.topk(2, dim=-1)
        return top.indices.reshape(-1, 2), torch.softmax(top.values, -1).reshape(-1, 2), output.reshape(-1, 6)

    xs = [torch.randn(5, 4) for _ in range(4)]
    with capture(net, tmp_path / "c", router="blocks.*.router", adapter=adapter, steps="manual") as cap:
        for i, x in enumerate(xs):
            net(x)
            if i % 2 == 1:
                cap.step()
    trace = load_trace(tmp_path / "c")
    assert trace.meta.num_layers == 3 and trace.meta.num_experts == 6
    assert trace.tokens_per_step() == {0: 10, 1: 10}
    e, _ = trace.dense()
    with torch.no_grad():
        h = xs[2]
        ref0 = net.blocks[0].router(h).topk(2, dim=-1).indices.numpy()
    np.testing.assert_array_equal(e[10:15, 0], ref0)


def test_no_moe_layers_error_names_search():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="no MoE layers found in Sequential.*TopKRouter"):
        capture(net, "/nonexistent/never")
    with pytest.raises(ValueError, match="matches 'x.gate'"):
        capture(net, "/nonexistent/never", router="x.gate")


def test_refuses_directory_with_other_run(tmp_path):
    model = _model("mixtral")
    d = tmp_path / "run"
    with capture(model, d):
        with torch.no_grad():
            model(input_ids=torch.randint(3, 64, (1, 4)))
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    run_id = read_manifest(d)["run_id"]
    with pytest.raises(ValueError, match=f"already holds another run's data \\(run {run_id}\\)"):
        with capture(model, d):
            pass
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_unwritable_path_is_an_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cannot write capture trace directory"):
        with capture(_model("mixtral"), blocker / "sub"):
            pass


def test_disk_full_mid_run_keeps_training_and_earlier_shards(tmp_path, monkeypatch):
    import workloads.capture as wc

    model = _model("mixtral")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    real_write = wc.write_parquet
    calls = {"n": 0}

    def flaky(trace, path):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(28, "No space left on device")
        return real_write(trace, path)

    monkeypatch.setattr(wc, "write_parquet", flaky)
    losses = []
    with pytest.warns(RuntimeWarning, match="No space left"):
        with capture(model, tmp_path / "d", optimizer=opt, flush_tokens=8, shard_rows=32, max_pending=1) as cap:
            for _ in range(6):
                ids = torch.randint(3, 64, (2, 8))
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(float(loss.detach()))
    assert len(losses) == 6 and all(np.isfinite(losses))  # training ran to the end
    assert isinstance(cap.error, OSError)
    man = read_manifest(tmp_path / "d")
    assert man["status"] == "failed" and "No space left" in man["error"] and len(man["shards"]) == 2
    for name in man["shards"]:
        read_parquet(tmp_path / "d" / name, allow_partial=True)  # a shard may end inside a step
    assert len(load_trace(tmp_path / "d")) > 0


def test_crash_leaves_only_complete_shards(tmp_path):
    """A run that dies mid-way: the manifest lists only complete shards and they read back."""
    model = _model("mixtral")
    cap = Capture(model, tmp_path / "k", flush_tokens=8, shard_rows=40)
    cap.__enter__()
    with torch.no_grad():
        for _ in range(5):
            model(input_ids=torch.randint(3, 64, (2, 8)))
    # simulate the crash: a half-written shard on disk, the writer never finalised
    (tmp_path / "k" / "shard-00099.parquet.tmp").write_bytes(b"PAR1 partial")
    cap._flush()
    cap._queue.put(None)
    cap._thread.join()
    man = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert man["status"] == "running" and man["shards"]
    assert all(not n.endswith(".tmp") for n in man["shards"])
    trace = load_trace(tmp_path / "k")
    assert len(trace) == sum(len(read_parquet(tmp_path / "k" / n, allow_partial=True)) for n in man["shards"])
    for h in cap._handles:
        h.remove()


@pytest.mark.parametrize("entry", ["../../x.parquet", "ABS", "link.parquet", "sub/../../../x.parquet"])
def test_manifest_paths_that_leave_the_directory_are_refused(tmp_path, entry):
    """A manifest's shard names are file names inside the capture directory: ``../../x.parquet``, an
    absolute path or a link pointing outside would read a file the capture never wrote."""
    from workloads.trace import write_parquet

    outside = tmp_path / "x.parquet"
    write_parquet(load_trace("default"), outside)
    cap = tmp_path / "runs" / "cap"
    cap.mkdir(parents=True)
    if entry == "ABS":
        entry = str(outside)
    if entry == "link.parquet":
        (cap / entry).symlink_to(outside)
    (cap / "manifest.json").write_text(json.dumps({"format": "moesim-capture", "version": 1, "status": "complete",
                                                   "shards": [entry], "logit_shards": [entry]}))
    msg = f"{cap / 'manifest.json'}: shards[0] = {entry!r} leads outside the capture directory {cap}; refusing"
    with pytest.raises(ValueError) as err:
        load_trace(str(cap))
    assert str(err.value).startswith(msg)
    with pytest.raises(ValueError, match="logit_shards\\[0\\] = .* leads outside the capture directory"):
        read_logits(cap)


@pytest.mark.parametrize("text,message", [
    ("{not json", "not a valid capture manifest (bad JSON"),
    ("[1, 2]", "not a valid capture manifest (a JSON object was expected)"),
    ('{"shards": "shard-00000.parquet"}', "key 'shards' must be a list of file names, got str"),
    ('{"shards": [null]}', "shards[0] must be a file name, got None"),
])
def test_malformed_manifest_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError) as err:
        load_trace(str(tmp_path))
    assert message in str(err.value) and str(tmp_path / "manifest.json") in str(err.value)
