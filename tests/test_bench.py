"""`ktm bench`: outputs and their fields, KV-cache scaling, the TTFT split, targets logic, bad arguments."""

from __future__ import annotations

import json

import pytest
import torch

from ktm import bench
from ktm.cli import main as cli_main
from ktm.errors import KTMError
from ktm.model import KTMModel, LoraSettings

ARGS = ["--models", "tiny-llama", "--lengths", "32", "64", "--ks", "2", "4", "--batch-sizes", "1", "2",
        "--repeats", "1", "--warmup", "0", "--decode-tokens", "3", "--train-length", "32", "--train-target-tokens", "4",
        "--device", "cpu", "--threads", "1"]


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
    assert meta["device_info"]["threads"] == 1 and meta["device_info"]["torch"] == torch.__version__
    assert "Random weights" in meta["weights_note"]
    # K=1 is added (the baseline); one row per (batch, length, K)
    assert sorted((r["batch"], r["length"], r["k"]) for r in res["rows"]) == sorted(
        (b, n, k) for b in (1, 2) for n in (32, 64) for k in (1, 2, 4))
    for r in res["rows"]:
        for key in ("ttft_e2e_s", "ceiling_s", "decode_tokens_per_s"):
            assert set(r[key]) >= {"median", "min", "max", "q1", "q3"} and r[key]["median"] > 0
        assert set(r["parts_s"]) == set(bench.PARTS)
        assert r["kv_cache_bytes"] > 0 and r["peak_memory_bytes"] >= 0
        assert r["e2e_speedup"] > 0 and r["ceiling_speedup"] > 0
        assert r["fraction_of_ceiling"] == pytest.approx(r["e2e_speedup"] / r["ceiling_speedup"])
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
    assert len(table) == 2 * len(res["rows"]) + len(res["train"])  # main table + split table + training
    header = md.splitlines()[md.splitlines().index(next(l for l in md.splitlines() if l.startswith("| model | batch | length | K | merged")))]
    for col in ("TTFT e2e", "ceiling", "e2e speed-up", "ceiling speed-up", "fraction of ceiling", "enc share",
                "KV cache", "decode tok/s"):
        assert col in header
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
    return {"model": "m", "batch": 1, "length": n, "k": k, "ttft_e2e_s": {"median": e2e}, "ceiling_s": {"median": ceil},
            "encoder_share": enc / pre if k > 1 else None, "encoder_flop_share": 0.1 if k > 1 else None}


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
    train = [{"model": "m", "batch": 1, "length": 8, "k": k, "samples_per_s": s} for k, s in ((1, 1.0), (2, 1.5), (4, 0.9))]
    bench.add_train_targets(train)
    assert [t["status"] for t in bench.target_summary(rows, train)][-1] == "MISS"
    train[2]["samples_per_s"] = 3.0
    bench.add_train_targets(train)
    assert train[2]["targets"] == {"faster_per_sample_than_K=1": "PASS"} and train[2]["speedup_per_sample"] == 3.0


@pytest.mark.parametrize("argv,words", [
    (["--ks", "0"], "--ks must be whole numbers >= 1"),
    (["--ks", "two"], "invalid int value"),
    (["--models", "gpt-9"], "unknown bench model 'gpt-9'"),
    (["--lengths", "2", "--ks", "4"], "shorter than K=4"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--lora-r", "0"], "needs LoRA"),
    (["--name", "../x"], "not a plain folder name"),
    (["--frobnicate"], "unrecognized arguments"),
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
