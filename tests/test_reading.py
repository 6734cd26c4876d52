"""The reading stage: text windows, continuation and reconstruction targets, the distillation teacher,
starting a run from an export (init_from). Tiny config-built models; one end-to-end test on the real base."""

from __future__ import annotations

import json

import pytest
import torch

from ktm.benchmarks.reading import CUE, Reading, reading_example, windows
from ktm.cli import main
from ktm.errors import KTMError
from ktm.io import write_json
from ktm.model import KTMModel, LoraSettings
from ktm.training.init_from import load_trained_weights
from ktm.training.module import KTMModule, distill_kl

TEXT = " ".join(f"w{i}" for i in range(100))


def test_windows_cut_at_words_without_overlap_and_spread_over_the_text():
    cuts = windows(TEXT, 6, 4, limit=3)
    assert len(cuts) == 3
    starts = [int(p.split()[0][1:]) for p, _ in cuts]
    assert starts == [0, 30, 60] and all(s % 10 == 0 for s in starts)  # 10 slots of 10 words, 3 spread picks
    for prefix, continuation in cuts:
        first = int(prefix.split()[0][1:])
        assert prefix.split() == [f"w{i}" for i in range(first, first + 6)]
        assert continuation == " " + " ".join(f"w{i}" for i in range(first + 6, first + 10))
    assert windows("too short", 6, 4, limit=3) == []


@pytest.mark.parametrize("whitespace", ["collapse", "keep"])
def test_windows_keep_the_texts_own_whitespace_only_when_asked(whitespace):
    code = "def f(x):\n    return x\n\n\nclass A:\n\tpass\n"  # 7 words
    (prefix, continuation), = windows(code, 5, 2, limit=1, whitespace=whitespace)
    if whitespace == "keep":  # the text itself, cut after the fifth word: newlines and indentation as written
        assert (prefix, continuation) == ("def f(x):\n    return x\n\n\nclass", " A:\n\tpass")
    else:
        assert (prefix, continuation) == ("def f(x): return x class", " A: pass")
    with pytest.raises(KTMError, match="reading whitespace must be one of collapse, keep, got 'strip'"):
        Reading(sources=["sotu"], whitespace="strip")


def _module(ks=(1, 4), **kw):
    torch.manual_seed(0)
    return KTMModule(base="config:tiny-llama", ks=list(ks), lora=LoraSettings(r=4), **kw)


def test_continuation_targets_are_exactly_the_tokens_after_the_cut():
    m = _module()
    prefix, continuation = windows(TEXT, 12, 5, limit=1)[0]
    e = reading_example(prefix, continuation, False, group="d")
    batch = {"prompts": [e.prompt], "targets": [e.target], "cues": [e.meta.get("cue", "")]}
    _, b = m._batch(batch, 4)
    scored = b.targets[0][b.targets[0] != -100].tolist()
    assert scored == m.model.tokenize_targets([continuation])[0]
    assert m.model.tokenizer.decode(scored[:-1]) == continuation


def test_reconstruction_targets_are_exactly_the_prefix_and_the_cue_is_read_not_scored():
    m = _module()
    prefix, _ = windows(TEXT, 12, 5, limit=1)[0]
    e = reading_example(prefix, "unused", True, group="d")
    assert e.target == prefix and e.meta["cue"] == CUE
    batch = {"prompts": [e.prompt], "targets": [e.target], "cues": [e.meta["cue"]]}
    _, b = m._batch(batch, 4)
    cue = m.model.tokenize_targets([CUE], add_eos=False)[0]
    scored = b.targets[0][b.targets[0] != -100].tolist()
    assert scored == m.model.tokenize_targets([prefix])[0]
    assert b.targets.shape[1] == len(cue) + len(scored)  # the cue sits in front of the target, unscored
    # the cue's tokens are the inputs right after the merged prompt
    cue_emb = m.model.embed(torch.tensor(cue))
    merged = int(b.merged_tokens[0])
    torch.testing.assert_close(b.inputs_embeds[0, merged : merged + len(cue)], cue_emb)


def test_teacher_is_the_bare_base_on_the_uncompressed_prompt():
    m = _module()
    for name, p in m.model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    prompts, targets = ["Tree: ab\n+cd, Answer: ", "x y z"], ["true", "some longer target"]
    ids, tids = m.model.tokenize_prompts(prompts), m.model.tokenize_targets(targets)
    teacher, _ = m.model.teacher_outputs(ids, tids)
    with_adapters = m.model.target_logits(m.model.build_batch(ids, 1, tids))
    bare = KTMModel.from_base("config:tiny-llama", ks=[1], lora=None)
    reference = bare.target_logits(bare.build_batch(ids, 1, tids))
    mask = m.model.build_batch(ids, 1, tids).targets != -100
    torch.testing.assert_close(teacher[mask], reference[mask], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(with_adapters[mask], reference[mask], atol=1e-3)


def test_distill_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    torch.manual_seed(0)
    a = torch.randn(2, 3, 11)
    targets = torch.tensor([[-100, 4, 5], [1, 2, 3]])
    assert float(distill_kl(a, a, targets)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_kl(a, a + torch.randn_like(a), targets)) > 0


def _export(tmp_path, ks=(1, 4), r=4, name="src"):
    m = _module(ks)
    with torch.no_grad():
        for p in m.model.trainable_parameters()["encoder"] + m.model.trainable_parameters()["lora"]:
            p.normal_(std=0.1)
    m.model.save(tmp_path / name)
    return m, tmp_path / name


def test_init_from_loads_lora_and_encoders_bit_exactly(tmp_path):
    src, folder = _export(tmp_path)
    fresh = _module()
    assert load_trained_weights(fresh.model, folder) == [4]
    for (n, a), (_, b) in zip(src.model.named_parameters(), fresh.model.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    via_config = _module(init_from=str(folder))
    assert torch.equal(via_config.model.encoders["4"].mlp[-1].weight, src.model.encoders["4"].mlp[-1].weight)


def test_init_from_says_when_the_merged_positions_change(tmp_path, caplog):
    _, folder = _export(tmp_path)
    spread = _module()
    spread.model.merged_positions = "spread"
    with caplog.at_level("INFO", logger="ktm"):
        assert load_trained_weights(spread.model, folder) == [4]
    assert f"model.init_from {folder} read merged blocks at compact positions; this run reads them at spread" in caplog.text


def test_init_from_refuses_another_k_another_lora_shape_and_another_base(tmp_path):
    _, folder = _export(tmp_path)
    with pytest.raises(KTMError, match="no merge encoder for K=\\[2\\]"):
        load_trained_weights(_module((1, 2, 4)).model, folder)
    torch.manual_seed(0)
    other_r = KTMModule(base="config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=8))
    with pytest.raises(KTMError, match="LoRA r=4, this run has 8"):
        load_trained_weights(other_r.model, folder)
    torch.manual_seed(0)
    shallow = KTMModule(base="config:tiny-llama", ks=[1, 4], encoder_shape="shallow")
    with pytest.raises(KTMError, match="has encoder_shape=paper, this run has shallow"):
        load_trained_weights(shallow.model, folder)
    meta = json.loads((folder / "ktm.json").read_text())
    del meta["encoder_shape"]  # an export from before the setting: the paper's encoder, named as such
    write_json(folder / "ktm.json", meta)  # with its checksum, as an export writes it
    with pytest.raises(KTMError, match="has encoder_shape=paper, this run has shallow"):
        load_trained_weights(shallow.model, folder)
    m = _module()  # the same shapes on other weights: the base fingerprint alone must refuse
    m.model.base_fingerprint = "config:other"
    with pytest.raises(KTMError, match="another base"):
        load_trained_weights(m.model, folder)


def test_a_reading_run_trains_on_local_text_and_reports_perplexity_beside_the_base(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"d{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(200)))
    root = str(tmp_path / "runs")
    args = ["fit", "--exp", "read_k4", "--root", root, "--run", "r", "--model.base=config:tiny-llama",
            f"--data.benchmark_args={{sources: ['path:{docs}'], prefix_words: 12, continuation_words: 4, "
            "windows_per_document: 4, max_documents: 12, test_fraction: 0.2, val_fraction: 0.2}",
            "--data.max_val_examples=8", "--data.max_test_examples=8", "--data.batch_size=4",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]
    assert main(args) == 0
    import json

    metrics = json.loads((tmp_path / "runs" / "read_k4" / "r" / "metrics.json").read_text())
    k4 = metrics["val"]["k4"]
    assert k4["perplexity_base"] > 1 and k4["perplexity_vs_base"] == pytest.approx(k4["perplexity"] / k4["perplexity_base"])
    assert metrics["data"]["benchmark"] == "reading"
    assert "ppl / base ppl" in (tmp_path / "runs" / "read_k4" / "r" / "results.md").read_text()
    init = ["fit", "--exp", "read_k4", "--root", root, "--run", "from_export", *args[7:],
            f"--model.init_from={tmp_path / 'runs' / 'read_k4' / 'r' / 'export'}"]
    assert main(init) == 0


def test_unknown_reading_source_is_one_line():
    with pytest.raises(KTMError, match="unknown reading source 'wikipedia'"):
        Reading(sources=["wikipedia"])


def test_a_hub_source_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KTMError, match="needs the Hugging Face hub"):
        Reading(sources=["hf:HuggingFaceFW/fineweb-edu"]).build("all")


@pytest.mark.slow
def test_a_few_reading_steps_on_the_real_base_from_the_offline_sources(tmp_path):
    root = str(tmp_path / "runs")
    assert main(["fit", "--exp", "read_k4", "--root", root, "--run", "e2e", "--trainer.max_steps=2",
                 "--data.benchmark_args={sources: [sotu], max_documents: 20, windows_per_document: 2}",
                 "--data.max_val_examples=4", "--data.max_test_examples=4", "--data.batch_size=2",
                 "--trainer.enable_progress_bar=false"]) == 0


def test_reading_a_benchmarks_text_takes_its_training_split_of_the_same_seed_only():
    """read_tree_k4 reads the tree's prompts before the task: none of the task's val/test trees may be among them."""
    from ktm.benchmarks.common import get_benchmark

    tree = get_benchmark("tree", seed=3)
    task = tree.load(tree.stages[0])
    reading = Reading(seed=3, sources=["benchmark:tree"], prefix_words=7, continuation_words=4, windows_per_document=1,
                      max_documents=100_000, reconstruction_share=0.5, whitespace="keep").build("all")
    read = {e.prompt for part in (reading.train, reading.val, reading.test) for e in part if e.meta["objective"] == "continuation"}
    read |= {e.target for e in reading.train if e.meta["objective"] == "reconstruction"}
    assert all(p.startswith("Tree: ") and "\n+" in p for p in list(read)[:50])  # the tree's lines, as the task writes them
    train_trees = {e.prompt.split(", Task:")[0] for e in task.train}
    assert read and all(p.split(", Task:")[0] in train_trees for p in read)


def test_benchmark_split_by_example_makes_each_prompt_a_document():
    """Amazon's offline training sentences come from three products: split by group, the reading val would be
    a third of them; split by example, 5% of the sentences each, none in two splits."""
    by = {split: Reading(seed=0, sources=["benchmark:amazon"], prefix_words=9, continuation_words=3, windows_per_document=1,
                         max_documents=100_000, benchmark_split=split).build("all") for split in ("group", "example")}
    assert len(by["group"].val) > 200  # one whole product
    ex = by["example"]
    assert 0.03 < len(ex.val) / (len(ex.train) + len(ex.val) + len(ex.test)) < 0.07
    assert not {e.group for e in ex.train} & {e.group for e in ex.val + ex.test}
    with pytest.raises(KTMError, match="reading benchmark_split must be one of group, example, got 'product'"):
        Reading(sources=["benchmark:amazon"], benchmark_split="product")


def test_reading_a_benchmark_passes_its_options_and_follows_its_data(tmp_path, monkeypatch):
    """benchmark:commitpack needs the task's data_dir; new commits in it must give new windows, not a stale cache."""
    from ktm.benchmarks import common

    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "cache")
    commits = tmp_path / "commits"
    commits.mkdir()

    def write(name, rows):
        (commits / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def edit(path, i, body):
        return {"repo": "o/r", "path": path, "commit": f"{path}-{i}", "subject": f"Change {i}",
                "old_contents": body, "new_contents": body + f"y = {i}\n"}

    write("train.jsonl", [edit(f"m{f}.py", i, f"def f{f}_{i}(a, b):\n    return a + b\n") for f in range(20) for i in range(2)])
    write("test.jsonl", [edit("t.py", 0, "def secret(a, b):\n    return a - b\n")])

    def build():
        return Reading(sources=["benchmark:commitpack"], prefix_words=6, continuation_words=2, windows_per_document=50,
                       whitespace="keep", benchmark_options={"source": "jsonl", "data_dir": str(commits)}).load("all")

    def text(splits):
        return "".join(e.prompt + e.target for part in (splits.train, splits.val, splits.test) for e in part)

    first = text(build())
    assert "def f" in first and "def g" not in first and "secret" not in first  # train file only
    write("train.jsonl", [edit(f"n{f}.py", 0, f"def g{f}(a, b):\n    return a * b\n") for f in range(20)])
    again = text(build())
    assert "def g" in again and "def f" not in again
    with pytest.raises(KTMError, match="bad options for benchmark 'commitpack'"):
        Reading(sources=["benchmark:commitpack"], benchmark_options={"data_folder": "x"})
    with pytest.raises(KTMError, match="reading benchmark_options are set but no source is benchmark:<name>"):
        Reading(sources=["sotu"], benchmark_options={"data_dir": "x"})
