"""`ktm eval` / KTMModel.drift: perplexity drift of merged prompts against uncompressed ones, on a user's texts."""

from __future__ import annotations

import json

import pytest
import torch

from ktm.cli import main
from ktm.benchmarks import get_benchmark
from ktm.drift import read_texts, reading_texts
from ktm.errors import KTMError
from ktm.io import write_json
from ktm.model import KTMModel, LoraSettings

WINDOW = dict(prefix_tokens=24, continuation_tokens=8)  # byte tokenizer: 32 bytes per text
CLI_WINDOW = ["--prefix-tokens", "24", "--continuation-tokens", "8"]
TEXTS = [f"Text {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs, then rests a while." for i in range(7)]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny model (2-layer Llama, byte tokenizer) with a non-trivial LoRA and encoders, exported."""
    torch.manual_seed(0)
    model = KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4], lora=LoraSettings(r=4))
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
        for enc in model.encoders.values():
            if enc.mlp is not None:
                torch.nn.init.normal_(enc.mlp[-1].weight, std=0.02)
    return model.save(tmp_path_factory.mktemp("drift") / "export")


@pytest.fixture(scope="module")
def model(export):
    return KTMModel.from_pretrained(export)


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*TEXTS, "too short"]))
    return path


def test_k1_against_itself_has_no_drift(model):
    out = model.drift(TEXTS, ks=[1], **WINDOW)
    (row,) = out["per_k"]
    assert row["k"] == 1 and abs(row["drift"]) <= 1e-6 and row["ppl_merged"] == pytest.approx(row["ppl_uncompressed"], rel=1e-6)
    assert out["texts"] == len(TEXTS) and out["tokens"] == len(TEXTS) * 8 and out["skipped"] == 0


def test_merged_ks_drift_and_default_ks(model):
    out = model.drift(TEXTS, **WINDOW)
    assert [r["k"] for r in out["per_k"]] == [2, 4]  # default: every K > 1 of the checkpoint
    for r in out["per_k"]:
        assert r["drift"] == pytest.approx(r["ppl_merged"] / r["ppl_uncompressed"] - 1)
        assert r["drift"] != 0  # random encoders and LoRA: merging changes the prediction
    assert [r["prefix_positions"] for r in out["per_k"]] == [12, 6]


def test_a_batch_gives_the_same_numbers_as_one_by_one(model):
    batched = model.drift(TEXTS, ks=[1, 2, 4], batch_size=3, **WINDOW)
    single = model.drift(TEXTS, ks=[1, 2, 4], batch_size=1, **WINDOW)
    for side, values in batched["nll_per_text"].items():
        assert values == pytest.approx(single["nll_per_text"][side], rel=1e-5, abs=1e-5)
    for a, b in zip(batched["per_k"], single["per_k"]):
        assert a["ppl_merged"] == pytest.approx(b["ppl_merged"], rel=1e-6) and a["drift"] == pytest.approx(b["drift"], abs=1e-6)


def test_short_texts_are_skipped_and_counted_and_max_texts_caps(model):
    out = model.drift(["short", *TEXTS[:3], "", "also short"], ks=[2], **WINDOW)
    assert out["texts"] == 3 and out["skipped"] == 3
    assert model.drift(TEXTS, ks=[2], max_texts=2, **WINDOW)["texts"] == 2
    with pytest.raises(KTMError, match=r"none of the 2 texts has 24 \+ 8 tokens"):
        model.drift(["short", "tiny"], ks=[2], **WINDOW)


def test_bad_arguments_are_one_clear_line(model):
    with pytest.raises(KTMError, match=r"K=3 is not in this checkpoint's ks \[1, 2, 4\]"):
        model.drift(TEXTS, ks=[2, 3], **WINDOW)
    with pytest.raises(KTMError, match="prefix_tokens must be a whole number >= 1"):
        model.drift(TEXTS, prefix_tokens=0)
    with pytest.raises(KTMError, match="does not fit this model"):
        model.drift(TEXTS, prefix_tokens=5000)
    with pytest.raises(KTMError, match="no texts to score"):
        model.drift([], ks=[2], **WINDOW)


def test_cli_agrees_with_the_method_and_exits_0_below_the_threshold(model, export, data, tmp_path, capsys):
    out = tmp_path / "drift.json"
    code = main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "2", "4", "--max-drift", "1e9", *CLI_WINDOW,
                 "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    assert "| K | policy | prefix positions | texts | tokens | ppl uncompressed | ppl merged | drift | status |" in captured.out
    assert "| 2 | fixed | 12.0 | 7 |" in captured.out
    assert "1 skipped (shorter than 32 tokens)" in captured.out and "| ABOVE |" not in captured.out
    assert "ktm eval" in captured.err  # the progress bar
    written = json.loads(out.read_text())
    expected = model.drift(TEXTS, ks=[2, 4], **WINDOW)
    assert written["status"] == "OK" and written["skipped"] == 1 and written["texts"] == len(TEXTS)
    for got, want in zip(written["per_k"], expected["per_k"], strict=True):
        assert got["status"] == "OK"
        assert got["policy"] == want.pop("policy") == "fixed"
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-9)


def test_cli_checks_each_merge_policy(model, export, data, tmp_path, capsys):
    out = tmp_path / "drift.json"
    code = main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "4", "--policies", "fixed", "budget",
                 "--segment-tokens", "8", "--policy-score", "random", "--max-drift", "1e9", *CLI_WINDOW, "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["per_k"]
    assert [(r["policy"], r["k"]) for r in rows] == [("fixed", 4), ("budget", 4)]
    assert "| 4 | budget |" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "4", "--keep-tail", "8", "--max-drift", "1e9", *CLI_WINDOW,
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["per_k"][0]["prefix_positions"] == 8 + 16 // 4  # 24 tokens (no BOS): the last 8 kept
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--policies", "budget", "--segment-tokens", "6", *CLI_WINDOW]) == 2
    assert "model.segment_tokens=6 is not a multiple of K=4" in capsys.readouterr().err


def test_cli_reads_the_merged_prompt_at_either_position_layout(model, export, data, tmp_path, capsys):
    out = tmp_path / "drift.json"
    args = ["eval", "--ckpt", str(export), "--data", str(data), "--ks", "4", "--max-drift", "1e9", *CLI_WINDOW, "--json", str(out)]
    assert main([*args, "--merged-positions", "spread"]) == 0
    written = json.loads(out.read_text())
    assert written["merged_positions"] == "spread" and "spread positions" in capsys.readouterr().out
    model.merged_positions = "spread"
    try:
        spread = model.drift(TEXTS, ks=[4], **WINDOW)["per_k"][0]
    finally:
        model.merged_positions = "compact"
    compact = model.drift(TEXTS, ks=[4], **WINDOW)["per_k"][0]
    assert written["per_k"][0]["ppl_merged"] == pytest.approx(spread["ppl_merged"], rel=1e-9) != compact["ppl_merged"]
    assert written["per_k"][0]["ppl_uncompressed"] == pytest.approx(compact["ppl_uncompressed"], rel=1e-9)  # K=1 has no blocks
    assert main([*args, "--merged-positions", "stretched"]) == 2
    assert "--merged-positions" in capsys.readouterr().err


def test_versus_compares_two_evaluations_of_the_same_windows(export, data, tmp_path, capsys):
    first, second, third = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    base = ["eval", "--ckpt", str(export), "--data", str(data), "--max-drift", "1e9", *CLI_WINDOW]
    assert main([*base, "--ks", "2", "4", "--json", str(first)]) == 0
    assert main([*base, "--ks", "4", "--versus", str(first), "--json", str(second)]) == 0  # the same model: ratio exactly 1
    out = capsys.readouterr().out
    assert "| side | ppl here | ppl there | ratio [95%] | texts better here |" in out
    assert "| K=4 |" in out and "| 1.000 [1.000–1.000] | 0% |" in out
    rows = json.loads(second.read_text())["versus"]["rows"]
    assert [r["side"] for r in rows] == ["uncompressed", "4"] and all(r["ratio"] == 1.0 for r in rows)
    # another layout of the same checkpoint (the last 8 tokens kept): the ratio is the two perplexities' ratio
    assert main([*base, "--ks", "4", "--keep-tail", "8", "--versus", str(first), "--json", str(third)]) == 0
    a, b = json.loads(third.read_text()), json.loads(first.read_text())
    k4 = a["versus"]["rows"][1]
    assert k4["ratio"] == pytest.approx(a["per_k"][0]["ppl_merged"] / b["per_k"][1]["ppl_merged"], rel=1e-9) != 1.0
    assert k4["low"] <= k4["ratio"] <= k4["high"]
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--prefix-tokens", "16", "--continuation-tokens", "8",
                 "--versus", str(first)]) == 2  # other windows: refused before the model loads
    assert "scored other windows (prefix_tokens 24, here 16)" in _one_error_line(capsys)
    assert main([*base, "--versus", str(data)]) == 2  # not written by ktm: no checksum
    assert f"--versus file {data} has no recorded" in _one_error_line(capsys)
    write_json(tmp_path / "metrics.json", {"val": {}})
    assert main([*base, "--versus", str(tmp_path / "metrics.json")]) == 2
    assert "is not a `ktm eval --json` result (no nll_per_text)" in _one_error_line(capsys)


def test_versus_takes_the_same_file_named_relatively(export, data, tmp_path, monkeypatch, capsys):
    first = tmp_path / "a.json"
    window = ["--ckpt", str(export), "--ks", "4", "--max-drift", "1e9", *CLI_WINDOW]
    assert main(["eval", "--data", str(data), *window, "--json", str(first)]) == 0
    monkeypatch.chdir(data.parent)
    assert main(["eval", "--data", data.name, *window, "--versus", str(first)]) == 0  # the same file: not refused
    assert "| 1.000 [1.000–1.000] |" in capsys.readouterr().out
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    assert main(["eval", "--data", str(other), *window, "--versus", str(first)]) == 2  # another file: refused
    assert "scored other windows (data " in _one_error_line(capsys)


def test_cli_exit_codes_follow_the_threshold(export, data, capsys):
    # K=1 against itself has no drift: OK at a zero threshold; any drift (> -1 always) is above -1.
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "1", "--max-drift", "1e-6", *CLI_WINDOW]) == 0
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "1", "2", "--max-drift", "-1", *CLI_WINDOW]) == 1
    assert capsys.readouterr().out.count("| ABOVE |") == 2


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("ktm: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist -> pass a .txt or .jsonl file"),
    ("not_utf8", "is not UTF-8 text (byte 12) -> convert it to UTF-8"),
    ("no_field", "row 1 has no field 'text' (its fields: body) -> pass --field"),
    ("bad_json", "line 1 is not JSON"),
    ("empty_folder", "holds no .txt/.md/.rst/.py/.jsonl file"),
    ("blank", "holds no text (every file or row is empty)"),
])
def test_bad_data_is_one_clear_line_and_exit_2(export, tmp_path, capsys, case, message):
    path = tmp_path / {"not_utf8": "latin1.txt", "no_field": "rows.jsonl", "bad_json": "rows.jsonl",
                       "empty_folder": "folder", "blank": "blank.txt"}.get(case, "nope.txt")
    if case == "not_utf8":
        path.write_bytes("caf\u00e9 ok ".encode("utf-8") + "caf\u00e9".encode("latin-1"))
    elif case == "no_field":
        path.write_text('{"body": "hello"}\n')
    elif case == "bad_json":
        path.write_text("{not json\n")
    elif case == "empty_folder":
        path.mkdir()
        (path / "notes.csv").write_text("a,b\n")
    elif case == "blank":
        path.write_text("  \n")
    assert main(["eval", "--ckpt", str(export), "--data", str(path), *CLI_WINDOW]) == 2
    line = _one_error_line(capsys)
    assert message in line and (case == "empty_folder" or str(path) in line)


def test_bad_k_and_bad_options_exit_2(export, data, capsys):
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--ks", "3", *CLI_WINDOW]) == 2
    assert "K=3 is not in this checkpoint's ks [1, 2, 4]" in _one_error_line(capsys)
    assert main(["eval", "--ckpt", str(export), "--data", str(data), "--max-drift", "nan"]) == 2
    assert "--max-drift must be a finite number" in _one_error_line(capsys)
    assert main(["eval", "--data", str(data)]) == 2
    assert "--ckpt" in _one_error_line(capsys)


def test_a_folder_reads_text_files_and_json_lines_with_another_field(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first text")
    (tmp_path / "sub" / "b.jsonl").write_text('{"body": "second"}\n\n{"body": "third"}\n')
    (tmp_path / "ignored.csv").write_text("x")
    assert read_texts(tmp_path, field="body") == ["first text", "second", "third"]


def test_reading_data_is_the_reading_stages_held_out_documents(export, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(40):  # 40 documents of 80 words; a word names its document
        (docs / f"d{i:02}.txt").write_text(" ".join(f"d{i:02}w{j}" for j in range(80)))
    spec = f"reading:path:{docs}"
    texts = reading_texts(spec, 24, 8)
    splits = get_benchmark("reading", sources=[f"path:{docs}"], prefix_words=24, continuation_words=8).load("all")
    held_out = {w[:3] for e in splits.test for w in (e.prompt + e.target).split()}
    trained = {w[:3] for e in splits.train for w in (e.prompt + e.target).split()}
    assert texts and held_out and held_out.isdisjoint(trained)
    for t in texts:  # one window of 24 + 8 consecutive words of one held-out document
        words = t.split()
        assert len(words) == 32 and {w[:3] for w in words} <= held_out and len({w[:3] for w in words}) == 1
    assert main(["eval", "--ckpt", str(export), "--data", spec, "--ks", "2", "--max-drift", "1e9", *CLI_WINDOW]) == 0
    out = capsys.readouterr().out
    assert f"| 2 | fixed | 12.0 | {len(texts)} |" in out and "; 0 skipped" in out  # a word is at least one token
    assert main(["eval", "--ckpt", str(export), "--data", "reading:", *CLI_WINDOW]) == 2
    assert "--data reading: names no reading source -> e.g. --data reading:sotu,django_docs" in _one_error_line(capsys)
    assert main(["eval", "--ckpt", str(export), "--data", "reading:nope", *CLI_WINDOW]) == 2
    assert "unknown reading source 'nope'" in _one_error_line(capsys)
    assert main(["eval", "--ckpt", str(export), "--data", spec, "--prefix-tokens", "0"]) == 2
    assert "prefix_tokens must be a whole number >= 1, got 0 -> pass e.g. --prefix-tokens 32" in _one_error_line(capsys)
