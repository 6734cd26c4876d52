"""`ktm bench`: outputs and their fields, KV-cache scaling, the TTFT split, interleaved rounds and per-round
ratios (scripted clock), matmul peak, targets logic, bad arguments; KTMModel's prefill/decode_step and
merged_for_serving, which the bench times."""

from __future__ import annotations

import json

import pytest
import torch

from ktm import bench
from ktm.cli import main as cli_main
from ktm.errors import KTMError
from ktm.model import KTMModel, LoraSettings

ARGS = ["--models", "tiny-llama", "--lengths", "32", "64", "--ks", "2", "4", "--batch", "1", "2",
        "--repeats", "2", "--warmup", "0", "--decode-tokens", "3", "--train-length", "32", "--train-target-tokens", "4",
        "--device", "cpu", "--dtype", "float32", "--threads", "1", "--peak-size", "64",  # float32 on every CPU
        "--versus-attention", "sdpa"]  # the ceiling with SDPA too, against --attention auto's blocked_causal


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One small CLI run shared by the output tests (through the real `ktm` entry point)."""
    root = tmp_path_factory.mktemp("bench")
    assert cli_main(["bench", *ARGS, "--name", "t", "--out-root", str(root)]) == 0
    out = root / "t"
    return out, json.loads((out / "results.json").read_text())


def test_cli_writes_all_outputs(run):
    out, res = run
    for f in ("results.json", "results.md", "speedup.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = res["meta"]
    assert meta["device_info"]["device"] == "cpu" and meta["device_info"]["dtype"] == "float32"
    assert meta["device_info"]["attention"] == "blocked_causal"  # --attention auto on CPU
    assert meta["device_info"]["threads"] == 1 and meta["device_info"]["torch"] == torch.__version__
    assert "Random weights" in meta["weights_note"]
    assert meta["environment"]["torch"] == torch.__version__ and "cpu_native_bf16" in meta["device_info"]
    assert set(meta["matmul_peak"]) == {"float32", "bfloat16"}
    assert all(p["size"] == 64 and p["best_gflops"] >= p["gflops"] > 0 for p in meta["matmul_peak"].values())
    # K=1 is added (the baseline); one row per (batch, length, K)
    assert sorted((r["batch"], r["length"], r["k"]) for r in res["rows"]) == sorted(
        (b, n, k) for b in (1, 2) for n in (32, 64) for k in (1, 2, 4))
    for r in res["rows"]:
        for key in ("ttft_e2e_s", "ceiling_s", "ttft_merged_s", "decode_tokens_per_s", "ceiling_versus_s"):
            assert set(r[key]) >= {"median", "min", "max", "q1", "q3"} and r[key]["median"] > 0
            assert len(r[key]["values"]) == 2  # one per timed round
        assert set(r["parts_s"]) == set(bench.PARTS)
        assert r["kv_cache_bytes"] > 0 and r["peak_memory_bytes"] >= 0
        assert r["e2e_speedup"] > 0 and r["ceiling_speedup"] > 0
        sp = r["speedups"]
        assert set(sp) == {"e2e", "ceiling", "fraction_of_ceiling", "unmerged_over_merged", "merged_over_ceiling",
                           "merged_vs_unmerged_k1", "attention_vs_versus"}
        # one kernel against the other: SDPA's ceiling over blocked_causal's, per round
        versus = [v / c for v, c in zip(r["ceiling_versus_s"]["values"], r["ceiling_s"]["values"])]
        assert sp["attention_vs_versus"]["values"] == pytest.approx(versus)
        assert sp["e2e"]["min"] <= r["e2e_speedup"] <= sp["e2e"]["max"]
        # the fraction is per round: median over rounds of (e2e ratio / ceiling ratio) of that round
        per_round = [e / c for e, c in zip(sp["e2e"]["values"], sp["ceiling"]["values"])]
        assert r["fraction_of_ceiling"] == pytest.approx(sum(per_round) / 2)  # median of two = their mean
        assert r["prefill_gflops"] > 0 and r["ceiling_gflops"] > 0
        assert r["prefill_fraction_of_peak"] == pytest.approx(r["prefill_gflops"] / meta["matmul_peak"]["float32"]["gflops"])
        assert r["ceiling_versus_gflops"] == pytest.approx(r["ceiling_gflops"] * r["ceiling_s"]["median"] / r["ceiling_versus_s"]["median"])
        assert r["ceiling_versus_fraction_of_peak"] == pytest.approx(r["ceiling_versus_gflops"] / meta["matmul_peak"]["float32"]["gflops"])
        assert r["prompt_tokens_per_s"] == pytest.approx(r["batch"] * r["length"] / r["ttft_e2e_s"]["median"])
        if r["k"] == 1:
            assert r["e2e_speedup"] == r["ceiling_speedup"] == 1.0 and r["encoder_share"] is None
        else:
            assert r["encoder_share"] == pytest.approx(r["parts_s"]["encoder"] / r["parts_s"]["prefill"])
            assert 0 < r["encoder_flop_share"] < 10
        assert ("fraction_of_ceiling>=0.9" in r["targets"]) == (r["k"] == 4)
    assert [t["k"] for t in res["train"]] == [1, 2, 4]
    assert all(t["samples_per_s"] > 0 and t["prompt_tokens_per_s"] == pytest.approx(32 * t["samples_per_s"])
               for t in res["train"])
    assert any(t["target"].startswith("K=4 trains faster per sample than K=1") for t in res["targets"])
    assert res["train"][2]["targets"] and not res["train"][0]["targets"]


def test_markdown_table_has_every_row_and_verdicts(run, capsys):
    out, res = run
    md = (out / "results.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| tiny-llama |")]
    assert len(table) == 5 * len(res["rows"]) + len(res["train"])  # main, split, compute, merged, versus + training
    header = md.splitlines()[md.splitlines().index(next(line for line in md.splitlines() if line.startswith("| model | batch | length | K | merged")))]
    for col in ("TTFT e2e", "ceiling", "e2e speed-up [min–max]", "ceiling speed-up", "fraction of ceiling [min–max]",
                "enc share", "KV cache", "decode tok/s"):
        assert col in header
    assert "Matmul peak (64x64x64 GEMM" in md and "merged_for_serving" in md and "GFLOP/s (% peak)" in md
    assert "with attention `blocked_causal` against `sdpa`" in md and "| sdpa / blocked_causal |" in md
    assert md.count("PASS") + md.count("MISS") == 2 * len(res["targets"])  # in the table rows and in the summary
    assert res["meta"]["command"].startswith("ktm bench --models tiny-llama")


def test_kv_cache_bytes_scale_with_one_over_k(run):
    _, res = run
    from ktm.base import CONFIG_SHAPES

    shape = CONFIG_SHAPES["tiny-llama"]
    per_pos = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * (shape["hidden_size"] // shape["num_attention_heads"]) * 4
    for r in res["rows"]:
        assert r["merged_length"] == r["length"] // r["k"]  # lengths divisible by K: no head tokens
        assert r["kv_cache_bytes"] == per_pos * r["batch"] * r["merged_length"]  # fp32 K and V of every layer
        k1 = next(b for b in res["rows"] if (b["batch"], b["length"], b["k"]) == (r["batch"], r["length"], 1))
        assert k1["kv_cache_bytes"] == r["k"] * r["kv_cache_bytes"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return KTMModel.from_base("config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=2)).eval()


def test_split_parts_add_up_and_hooks_are_removed(model):
    texts = bench.make_texts(model, 40, 2, seed=1)
    clock = bench.Clock(torch.device("cpu"))
    total, parts, batch, out = bench.e2e_once(model, texts, 4, clock)
    assert set(parts) == set(bench.PARTS)
    assert parts["embed"] > 0 and parts["encoder"] > 0 and parts["prefill"] > 0 and parts["tokenize"] > 0
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6)
    assert batch.inputs_embeds.shape[1] == 10 and out.logits.shape[1] == 1  # 40 tokens / K=4, last logits only
    assert not model.embed._forward_hooks and not model.embed._forward_pre_hooks
    assert not model.encoders["4"]._forward_hooks


def test_make_texts_gives_exact_lengths(model):
    for n in (8, 33, 100):
        texts = bench.make_texts(model, n, 3, seed=2)
        assert [len(r) for r in model.tokenize_prompts(texts)] == [n] * 3 and len(set(texts)) == 3


def test_decode_reuses_the_prefill_cache(model):
    clock = bench.Clock(torch.device("cpu"))
    _, _, batch, out = bench.e2e_once(model, bench.make_texts(model, 32, 2, seed=3), 4, clock)
    L = batch.inputs_embeds.shape[1]
    assert out.past_key_values.get_seq_length() == L
    tps = bench.decode_once(model, batch, out, 5, clock)
    assert tps > 0 and out.past_key_values.get_seq_length() == L  # cropped back: the next repeat decodes the same


def test_ceiling_runs_the_bare_base(model, monkeypatch):
    """LoRA is switched off for the ceiling (peft's disable_adapter), and back on afterwards."""
    seen = []
    orig = model.lm.disable_adapter

    def spy():
        seen.append(True)
        return orig()

    monkeypatch.setattr(model.lm, "disable_adapter", spy)
    t = bench.ceiling_once(model, torch.randn(1, 12, model.hidden_size), bench.Clock(torch.device("cpu")))
    assert t > 0 and seen == [True]


def test_kv_cache_bytes_legacy_tuples():
    kv = tuple((torch.zeros(2, 3, 5, 4), torch.zeros(2, 3, 5, 4)) for _ in range(3))
    assert bench.kv_cache_bytes(kv) == 3 * 2 * 2 * 3 * 5 * 4 * 4
    assert bench.kv_cache_bytes(torch.zeros(10, dtype=torch.bfloat16)) == 20


def test_flop_estimate_matches_hand_count(model):
    # tiny-llama K=4 encoder: 4d -> 6d -> 4d -> d with d=64, per merged position
    d = 64
    assert bench.encoder_flops(model, 4, 1, 10) == 2 * 10 * (4 * d * 6 * d + 6 * d * 4 * d + 4 * d * d)
    # attention grows quadratically, linear layers linearly: doubling L more than doubles the FLOPs
    assert bench.prefill_flops(model, 1, 200) > 2 * bench.prefill_flops(model, 1, 100)
    assert bench.prefill_flops(model, 2, 100) == 2 * bench.prefill_flops(model, 1, 100)


def _row(n, k, e2e, ceil, enc=0.01, pre=1.0):
    return {"model": "m", "batch": 1, "length": n, "k": k, "ttft_e2e_s": bench.stats([e2e]), "ceiling_s": bench.stats([ceil]),
            "encoder_share": enc / pre if k > 1 else None, "encoder_flop_share": 0.1 if k > 1 else None}


def _train(k, step):
    return {"model": "m", "batch": 1, "length": 8, "k": k, "step_s": bench.stats([step]), "samples_per_s": 1 / step}


def test_targets_pass_and_miss():
    rows = [_row(2048, 1, 10.0, 10.0), _row(2048, 4, 2.5, 2.4, enc=0.02), _row(512, 1, 4.0, 4.0), _row(512, 4, 2.0, 1.0, enc=0.5)]
    bench.add_speedups(rows)
    r2048, r512 = rows[1], rows[3]
    assert r2048["e2e_speedup"] == pytest.approx(4.0) and r2048["fraction_of_ceiling"] == pytest.approx(0.96)
    assert r2048["targets"] == {"fraction_of_ceiling>=0.9": "PASS", "encoder_share<=5%": "PASS"}
    assert r512["fraction_of_ceiling"] == pytest.approx(0.5) and r512["targets"] == {"fraction_of_ceiling>=0.9": "MISS"}
    rows[1]["encoder_share"] = 0.11
    bench.add_speedups(rows)
    assert rows[1]["targets"]["encoder_share<=5%"] == "MISS"
    train = [_train(1, 1.0), _train(2, 1 / 1.5), _train(4, 1 / 0.9)]
    bench.add_train_targets(train)
    assert [t["status"] for t in bench.target_summary(rows, train)][-1] == "MISS"
    train[2] = _train(4, 1 / 3.0)
    bench.add_train_targets(train)
    assert train[2]["targets"] == {"faster_per_sample_than_K=1": "PASS"} and train[2]["speedup_per_sample"] == pytest.approx(3.0)


@pytest.mark.parametrize("argv,words", [
    (["--ks", "0"], "--ks must be whole numbers >= 1"),
    (["--ks", "two"], "invalid int value"),
    (["--models", "gpt-9"], "unknown bench model 'gpt-9'"),
    (["--lengths", "2", "--ks", "4"], "shorter than K=4"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--lora-r", "0"], "needs LoRA"),
    (["--name", "../x"], "not a plain folder name"),
    (["--frobnicate"], "unknown option --frobnicate"),
])
def test_bad_arguments_are_one_line_errors(argv, words, capsys, tmp_path):
    with pytest.raises(KTMError, match=words.replace("(", r"\(")):
        bench.main(["--models", "tiny-llama", "--device", "cpu", "--out-root", str(tmp_path), *argv])
    assert cli_main(["bench", "--device", "cpu", "--out-root", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ktm: error: ")
    assert not list(tmp_path.iterdir())  # nothing written


def test_too_long_for_the_context_is_clear(tmp_path):
    with pytest.raises(KTMError, match="longer than tiny-llama's context of 2048"):
        bench.main(["--models", "tiny-llama", "--lengths", "4096", "--device", "cpu", "--out-root", str(tmp_path)])


def test_help_documents_every_option(capsys):
    parser = bench.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0 and "full grid" in capsys.readouterr().out


# -- interleaved rounds and per-round ratios, on a scripted clock (no real timing) ------------------------
class ScriptedTime:
    """A time source for bench.Clock: the n-th timed step 'takes' durations[n] seconds."""

    def __init__(self, durations):
        self.stamps, t = [], 0.0
        for d in durations:
            self.stamps += [t, t + d]
            t += d + 1.0  # a gap between steps, which no measurement may include

    def __call__(self):
        return self.stamps.pop(0)


def _scripted_steps(clock, order, log):
    def step(key):
        log.append(key)
        return bench.timed(lambda: None, clock)

    return {key: (lambda key=key: step(key)) for key in order}


def test_rounds_interleave_every_k_and_ratios_are_per_round():
    order = [("e2e", 1), ("ceiling", 1), ("e2e", 4), ("ceiling", 4)]
    # one warm-up round (100 s each: must not count), then 3 timed rounds; K=1's e2e is hit by noise in round 2
    script = {("e2e", 1): [10.0, 30.0, 10.0], ("ceiling", 1): [8.0, 8.0, 8.0],
              ("e2e", 4): [3.0, 3.0, 2.5], ("ceiling", 4): [2.2, 2.2, 2.0]}
    durations = [100.0] * 4 + [script[key][r] for r in range(3) for key in order]
    clock, log = bench.Clock(torch.device("cpu"), clock=ScriptedTime(durations)), []
    res = bench.run_rounds(_scripted_steps(clock, order, log), repeats=3, warmup=1)
    assert log == order * 4  # each round runs every K and its ceiling back to back
    assert res == {key: pytest.approx(v) for key, v in script.items()}
    rows = [{**_row(512, k, 0, 0), "ttft_e2e_s": bench.stats(res[("e2e", k)]), "ceiling_s": bench.stats(res[("ceiling", k)])}
            for k in (1, 4)]
    bench.add_speedups(rows)
    r4 = rows[1]
    e2e = [10 / 3.0, 30 / 3.0, 10 / 2.5]  # per round: K=1 time / K=4 time of the same round
    ceil = [8 / 2.2, 8 / 2.2, 8 / 2.0]
    assert r4["speedups"]["e2e"]["values"] == pytest.approx(e2e)
    assert r4["e2e_speedup"] == pytest.approx(4.0) and r4["speedups"]["e2e"]["min"] == pytest.approx(10 / 3)
    assert r4["speedups"]["e2e"]["max"] == pytest.approx(10.0)  # the noisy round shows in the spread only
    assert r4["e2e_speedup_of_medians"] == pytest.approx(10 / 3.0)  # ratio of medians: another number
    assert r4["ceiling_speedup"] == pytest.approx(8 / 2.2)
    assert r4["fraction_of_ceiling"] == pytest.approx(1.0)  # median of [0.917, 2.75, 1.0]
    assert r4["speedups"]["fraction_of_ceiling"]["values"] == pytest.approx([e / c for e, c in zip(e2e, ceil)])
    assert rows[0]["speedups"]["e2e"]["values"] == [1.0, 1.0, 1.0]


def test_merged_ratios_and_decode_are_paired_by_round():
    rows = [_row(512, 1, 0, 0), _row(512, 4, 0, 0)]
    for r, e2e, merged, ceil, dec in ((rows[0], [10, 12], [8, 9], [7, 7], [5, 6]), (rows[1], [3, 4], [2, 2], [1.5, 1.6], [5, 3])):
        r.update(ttft_e2e_s=bench.stats(e2e), ttft_merged_s=bench.stats(merged), ceiling_s=bench.stats(ceil),
                 decode_tokens_per_s=bench.stats(dec))
    bench.add_speedups(rows)
    sp = rows[1]["speedups"]
    assert sp["unmerged_over_merged"]["values"] == pytest.approx([3 / 2, 4 / 2])
    assert sp["merged_over_ceiling"]["values"] == pytest.approx([2 / 1.5, 2 / 1.6])
    assert sp["merged_vs_unmerged_k1"]["values"] == pytest.approx([10 / 2, 12 / 2])
    assert rows[1]["decode_vs_k1"] == pytest.approx((5 / 5 + 3 / 6) / 2)
    with pytest.raises(ValueError, match="2 and 3 values"):
        bench.per_round([1.0, 2.0], [1.0, 2.0, 3.0])


def test_matmul_peak_gflops_from_scripted_time_and_fraction_of_peak(model):
    clock = bench.Clock(torch.device("cpu"), clock=ScriptedTime([0.5, 0.25, 1.0]))  # median 0.5 s, best 0.25 s
    peak = bench.matmul_peak(torch.device("cpu"), "bfloat16", 32, 3, clock)
    assert peak["gflops"] == pytest.approx(2 * 32**3 / 0.5 / 1e9) and peak["best_gflops"] == pytest.approx(2 * 32**3 / 0.25 / 1e9)
    row = {"batch": 2, "merged_length": 10, "parts_s": {"prefill": 0.01}, "ceiling_s": {"median": 0.02}}
    bench.add_flop_rates([row], model, {"gflops": 4.0})
    assert row["prefill_gflops"] == pytest.approx(bench.prefill_flops(model, 2, 10) / 0.01 / 1e9)
    assert row["ceiling_gflops"] == pytest.approx(bench.prefill_flops(model, 2, 10, lora=False) / 0.02 / 1e9)
    assert row["prefill_fraction_of_peak"] == pytest.approx(row["prefill_gflops"] / 4.0)
    # the bare base has no LoRA matmuls: fewer FLOPs than with the adapter, more than none at all
    assert 0 < bench.prefill_flops(model, 1, 10, lora=False) < bench.prefill_flops(model, 1, 10)


def test_speedup_figure_names_device_dtype_n_and_ceiling(run):
    _, res = run
    fig = bench.speedup_figure(res["rows"], res["meta"]["device_info"])
    title = " ".join(fig._suptitle.get_text().split())  # wrapped to the figure's width: compare words
    assert "cpu" in title and "float32" in title and " ".join(res["meta"]["device_info"]["cpu"].split()) in title
    note = " ".join(" ".join(t.get_text() for t in fig.texts).split())
    assert "N = prompt length in tokens" in note and "ceiling = the bare base" in note and "merged length" in note
    ax = fig.axes[0]
    assert "K" in ax.get_xlabel() and "speed-up" in ax.get_ylabel()
    assert any(t.get_text().startswith("N=32 tokens") for t in ax.get_legend().get_texts())


def test_bench_uses_the_models_public_prefill_and_decode_step(model, monkeypatch):
    calls = []
    for name in ("prefill", "decode_step"):
        orig = getattr(model, name)
        monkeypatch.setattr(model, name, lambda *args, orig=orig, name=name: calls.append(name) or orig(*args))
    clock = bench.Clock(torch.device("cpu"))
    _, _, batch, out = bench.e2e_once(model, bench.make_texts(model, 16, 1, seed=4), 4, clock)
    bench.decode_once(model, batch, out, 3, clock)
    assert calls == ["prefill", "decode_step", "decode_step", "decode_step"]


# -- KTMModel: prefill / decode_step, merged_for_serving ------------------------------------------------------
PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello", "abcdefghijklmnopq"]


@pytest.fixture(scope="module")
def lora_model():
    """Tiny Llama (tied head) whose LoRA B matrices and encoder last layers are non-zero, so a merge that lost
    or double-counted the adapter, or an encoder that saw a changed embedding table, would show."""
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=4))
    with torch.no_grad():
        for name, p in m.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        torch.nn.init.normal_(m.encoders["4"].mlp[-1].weight, std=0.05)
    return m.eval()


def test_prefill_and_decode_step_reproduce_generate_ids(lora_model):
    m = lora_model
    ids = m.tokenize_prompts(PROMPTS)
    want = m.generate_ids(ids, k=4, max_new_tokens=5)
    batch = m.build_batch(ids, 4)
    out = m.prefill(batch)
    mask, pos, tokens = batch.attention_mask, batch.position_ids, []
    for _ in range(5):
        nxt = m.pick(out.logits[:, -1])
        tokens.append(nxt)
        out, mask, pos = m.decode_step(nxt, mask, pos, out.past_key_values)  # full position_ids accepted too
    rows = torch.stack(tokens, 1).tolist()
    assert [r[: len(w)] for r, w in zip(rows, want)] == want
    assert mask.shape[1] == batch.attention_mask.shape[1] + 5 and pos.shape == (len(ids), 1)


def test_merged_for_serving_same_logits_and_generation_embeddings_untouched(lora_model):
    m = lora_model
    embed_before = m.embed.weight.detach().clone()
    merged = m.merged_for_serving()
    assert torch.equal(merged.embed.weight, embed_before) and torch.equal(m.embed.weight, embed_before)
    assert not any("lora_" in n for n, _ in merged.lm.named_modules()) and merged.lora_merged
    head = merged.lm.get_output_embeddings().weight
    assert head.data_ptr() != merged.embed.weight.data_ptr()  # untied: the head carries its LoRA delta alone
    assert not torch.equal(head, embed_before)  # ...and it did get one (lm_head is a LoRA target)
    assert hasattr(m.lm, "disable_adapter")  # the original keeps its adapter
    ids = m.tokenize_prompts(PROMPTS)
    for k in (1, 4):
        a = m.forward(m.build_batch(ids, k)).logits
        b = merged.forward(merged.build_batch(ids, k)).logits
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # W x + B A x vs (W + B A) x: same up to rounding
        assert m.generate_ids(ids, k=k, max_new_tokens=8) == merged.generate_ids(ids, k=k, max_new_tokens=8)
    with m.lm.disable_adapter():  # the LoRA is not trivial: without it the logits differ, so the check above means something
        bare = m.forward(m.build_batch(ids, 4)).logits
    assert not torch.allclose(bare, merged.forward(merged.build_batch(ids, 4)).logits, atol=1e-3)


def test_merge_without_untying_is_caught(lora_model, monkeypatch):
    """The bit-identity check is live: merging into a head still tied to the embeddings changes the table."""
    import ktm.model as km

    monkeypatch.setattr(km, "_untie_output_embeddings", lambda lm, embed: None)
    with pytest.raises(AssertionError, match="changed the input embedding table"):
        lora_model.merged_for_serving()


def test_merged_model_refuses_to_save_and_no_lora_is_a_copy(lora_model, tmp_path):
    with pytest.raises(KTMError, match="LoRA is merged into its base weights"):
        lora_model.merged_for_serving().save(tmp_path / "export")
    assert not (tmp_path / "export").exists()
    torch.manual_seed(0)
    plain = KTMModel.from_base("config:tiny-llama", ks=[1, 2], lora=None).eval()
    copy = plain.merged_for_serving()
    assert copy is not plain and not copy.lora_merged and copy.tokenizer is plain.tokenizer
    ids = plain.tokenize_prompts(PROMPTS)
    torch.testing.assert_close(copy.forward(copy.build_batch(ids, 2)).logits, plain.forward(plain.build_batch(ids, 2)).logits)


def test_batch_merged_and_peak_options_parse_on_cpu():
    a = bench.parse_args(["--models", "tiny-llama", "--device", "cpu", "--batch", "4", "1", "--no-merged"])
    assert a.batch_sizes == [1, 4] and a.merged is False and a.peak_size == 2048  # CPU default GEMM side
    a = bench.parse_args(["--models", "tiny-llama", "--device", "cpu", "--batch-sizes", "2", "--peak-size", "0"])
    assert a.batch_sizes == [2] and a.merged is True and a.peak_size == 0
    with pytest.raises(KTMError, match="--peak-size must be >= 0"):
        bench.parse_args(["--models", "tiny-llama", "--device", "cpu", "--peak-size", "-1"])
    assert a.attention == "blocked_causal"  # --attention auto: the CPU's faster kernel (README Speed)
    assert bench.parse_args(["--models", "tiny-llama", "--device", "cpu", "--attention", "sdpa"]).attention == "sdpa"


@pytest.mark.parametrize("native, dtype", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_cpu_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native, dtype):
    import ktm.environment

    monkeypatch.setattr(ktm.environment, "cpu_has_native_bf16", lambda: native)
    assert bench.parse_args(["--models", "tiny-llama", "--device", "cpu"]).dtype == dtype
    assert bench.parse_args(["--models", "tiny-llama", "--device", "cpu", "--dtype", "float32"]).dtype == "float32"


def test_compile_runs_every_prefill_compiled_and_restores_the_eager_lm(lora_model):
    """`ktm bench --compile`: inside, the model's and the served copy's LM are torch.compile'd and give the eager
    logits (adapters on, and off for the ceiling: peft's switch still reaches the compiled LM); afterwards the
    eager modules are back, so the training step and later code never see the wrapper."""
    from torch._dynamo.eval_frame import OptimizedModule

    m, served = lora_model, lora_model.merged_for_serving()
    eager = (m.lm, served.lm)
    batch = m.build_batch(m.tokenize_prompts(PROMPTS), 4)
    want = m.prefill(batch).logits
    with m.bare_base():
        want_bare = m.prefill(batch).logits
    with bench.compiled_lms(m, None, served):
        assert isinstance(m.lm, OptimizedModule) and isinstance(served.lm, OptimizedModule)
        got = m.prefill(batch).logits
        with m.bare_base():
            got_bare = m.prefill(batch).logits
        got_served = served.prefill(served.build_batch(served.tokenize_prompts(PROMPTS), 4)).logits
    assert m.lm is eager[0] and served.lm is eager[1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_bare, want_bare, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_served, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got_bare, got, atol=1e-3)  # the bare run really had its adapters off


def test_profile_writes_the_bare_base_prefill_operator_table(tmp_path):
    argv = ["--models", "tiny-llama", "--lengths", "32", "--ks", "2", "--repeats", "1", "--warmup", "0",
            "--decode-tokens", "0", "--train-length", "0", "--device", "cpu", "--dtype", "float32", "--threads", "1",
            "--peak-size", "0", "--no-merged", "--profile", "--name", "p", "--out-root", str(tmp_path)]
    res = bench.main(argv)
    text = (tmp_path / "p" / "prefill_profile.txt").read_text()
    assert text.startswith("## tiny-llama, batch 1, 32 tokens, bare base (K=1 ceiling)\none prefill, ")
    assert "Self CPU" in text and ("aten::mm" in text or "aten::addmm" in text or "aten::linear" in text)
    assert list(res["profiles"]) == ["tiny-llama, batch 1, 32 tokens, bare base (K=1 ceiling)"]
    assert not res["meta"]["device_info"]["compiled"]
