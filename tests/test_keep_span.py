"""Spans that stay in tokens (issue #17): a prompt given as (text to merge, text to keep) keeps its second
text's tokens unmerged, with every compressor; benchmarks mark that span (Example.keep) and
`model.keep_marked` decides whether training and evaluation use it. Off (the default) is today's path."""

from __future__ import annotations

import json

import pytest
import torch

from ktm.benchmarks import get_benchmark
from ktm.benchmarks.commitpack import _Filter, format_prompt, kept_suffix
from ktm.benchmarks.common import Example
from ktm.benchmarks.tree import PROMPT, QUESTION, TreeBenchmark
from ktm.cli import main
from ktm.compressors import get_compressor, names
from ktm.errors import KTMError
from ktm.metrics import KMetrics
from ktm.model import KTMModel, block_layout, check_settings, merged_length, split_marked
from ktm.training.data import collate
from ktm.training.module import checkpoint_mismatch

PAIRS = [("Tree: ab\n+cd, Task: Parent/Child Relationship,", " Parent: ab, Child: cd, Answer: "),
         ("hi", ""), ("abc", "d"), ("", "abcde"), ("a much longer prompt than the others, with several words", " in it?"),
         ("abcdefghij", "xyz")]
TARGETS = ["true", "false", "x", "yz", "true", "a b c"]
LOCAL = [n for n in names() if n != "llmlingua2"]  # llmlingua2 takes the same generic path (Compressor.embeddings)


def _ids(model: KTMModel, pairs):
    """What encode_prompts must give, spelled out: the merged text with the tokenizer's specials, then the kept text without."""
    tok = model.tokenizer
    ids = [tok(m, add_special_tokens=True)["input_ids"] + tok(k, add_special_tokens=False)["input_ids"] for m, k in pairs]
    return ids, [len(tok(k, add_special_tokens=False)["input_ids"]) for _, k in pairs]


def _real(batch, i: int, n_targets: int = 0) -> torch.Tensor:
    """Example i's prompt positions (left padding and targets cut off)."""
    e = batch.inputs_embeds[i, batch.attention_mask[i].bool()]
    return e[: e.shape[0] - n_targets]


@pytest.mark.parametrize("n,k,keep_tail,kept,expected", [
    (10, 4, 0, 0, (2, 2, 0)),   # today's layout
    (10, 4, 0, 3, (3, 1, 3)),   # the span is the tail
    (10, 4, 2, 3, (1, 1, 5)),   # keep_tail tokens before the span stay too
    (12, 4, 0, 4, (0, 2, 4)),
    (3, 4, 0, 3, (0, 0, 3)),    # all kept
    (5, 4, 4, 3, (0, 0, 5)),    # keep_tail + kept past the prompt: all of it, no more
    (7, 1, 0, 2, (0, 5, 2)),
    (9, 2, 1, 0, (0, 4, 1)),
])
def test_layout_with_a_kept_span(n, k, keep_tail, kept, expected):
    head, blocks, tail = block_layout(n, k, keep_tail, kept)
    assert (head, blocks, tail) == expected
    assert head + blocks * k + tail == n and head < k and tail == min(keep_tail + kept, n)
    assert merged_length(n, k, keep_tail, kept) == head + blocks + tail == merged_length(n - kept, k, keep_tail) + kept


def test_encode_prompts_is_the_one_tokenization(tiny):
    ids, kept = tiny.encode_prompts(PAIRS)
    assert (ids, kept) == _ids(tiny, PAIRS)
    strings = [m + k for m, k in PAIRS]
    plain, zero = tiny.encode_prompts(strings)
    assert plain == tiny.tokenize_prompts(strings) == tiny.tokenizer(strings, add_special_tokens=True)["input_ids"]
    assert zero == [0] * len(strings)
    mixed, mixed_kept = tiny.encode_prompts([PAIRS[0], strings[1], ("hi", "")])  # strings and pairs in one call
    assert mixed == [ids[0], plain[1], plain[1]] and mixed_kept == [kept[0], 0, 0]  # (p, "") is p
    with pytest.raises(KTMError, match="encode_prompts"):
        tiny.tokenize_prompts([PAIRS[0]])  # the kept count must not get lost on the way


def test_off_is_todays_path_bit_for_bit(tiny):
    """keep_marked off: examples' prompts go through as strings, kept counts are all zero, and build_batch with
    zero kept counts is build_batch without them, for every compressor. (Checked against the code before the
    change too: every compressor, K and keep_tail, generate, classify, merge gave identical tensors.)"""
    assert tiny.keep_marked is False and tiny.metadata()["keep_marked"] is False
    examples = [Example(prompt=m + k, target=t, keep=k) for (m, k), t in zip(PAIRS, TARGETS)]
    batch = collate(examples)
    assert tiny.example_prompts(batch["prompts"], batch["keeps"]) == batch["prompts"]
    ids = tiny.tokenize_prompts(batch["prompts"])
    targets = tiny.tokenize_targets(TARGETS)
    for keep_tail in (0, 3):
        tiny.keep_tail = keep_tail
        for name in LOCAL:
            tiny.compressor = get_compressor(name)
            for k in (1, 2, 4):
                a = tiny.build_batch(ids, k, targets)
                b = tiny.build_batch(ids, k, targets, kept=[0] * len(ids))
                for field in ("inputs_embeds", "attention_mask", "position_ids", "targets", "prompt_tokens", "merged_tokens"):
                    assert torch.equal(getattr(a, field), getattr(b, field)), (name, k, field)


@pytest.mark.parametrize("keep_tail", [0, 2])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_the_kept_span_is_exactly_its_token_embeddings(tiny, k, keep_tail):
    tiny.keep_tail = keep_tail
    ids, kept = tiny.encode_prompts(PAIRS)
    targets = tiny.tokenize_targets(TARGETS)
    batch = tiny.build_batch(ids, k, targets, kept=kept)
    for i, (p, c, t) in enumerate(zip(ids, kept, targets)):
        real = _real(batch, i, len(t))
        tail = min(keep_tail + c, len(p))
        assert real.shape[0] == merged_length(len(p), k, keep_tail, c) == int(batch.merged_tokens[i])
        want = tiny.embed(torch.tensor(p[len(p) - tail :], dtype=torch.long))
        assert torch.equal(real[real.shape[0] - tail :], want)  # bit for bit: never through the encoder
        head, blocks, _ = block_layout(len(p), k, keep_tail, c)
        body = tiny.embed(torch.tensor(p[head : head + blocks * k], dtype=torch.long)).reshape(blocks, k, tiny.hidden_size)
        merged = tiny.encoders[str(k)](body)
        torch.testing.assert_close(real[head : head + blocks], merged, atol=1e-6, rtol=1e-5)  # the rest is merged as before


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", LOCAL)
def test_batch_invariance_with_mixed_kept_lengths(tiny, name, k):
    tiny.compressor = get_compressor(name)
    with torch.no_grad():
        for n, p in tiny.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    ids, kept = tiny.encode_prompts(PAIRS)
    targets = tiny.tokenize_targets(TARGETS)
    batch = tiny.build_batch(ids, k, targets, kept=kept)
    together = tiny.forward(batch, logits_to_keep=1).logits[:, -1]
    nll, counts, _ = tiny.target_nll(batch)
    for i, (p, c, t) in enumerate(zip(ids, kept, targets)):
        alone = tiny.build_batch([p], k, [t], kept=[c])
        assert int(alone.merged_tokens[0]) == int(batch.merged_tokens[i])
        torch.testing.assert_close(_real(batch, i), _real(alone, 0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together[i : i + 1], tiny.forward(alone, logits_to_keep=1).logits[:, -1], atol=1e-4, rtol=1e-4)
        a_nll, a_counts, _ = tiny.target_nll(alone)
        torch.testing.assert_close(nll[i : i + 1], a_nll, atol=1e-4, rtol=1e-4)
        assert counts[i] == a_counts[0]


def test_the_encoder_runs_once_per_batch(tiny):
    calls = []
    handle = tiny.encoders["4"].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    ids, kept = tiny.encode_prompts(PAIRS)
    tiny.build_batch(ids, 4, kept=kept)
    handle.remove()
    assert calls == [sum(block_layout(len(p), 4, 0, c)[1] for p, c in zip(ids, kept))]


@pytest.mark.parametrize("keep_tail", [0, 3])
@pytest.mark.parametrize("name", LOCAL)
def test_every_baseline_keeps_the_span_and_compresses_the_rest_at_its_budget(tiny, name, keep_tail):
    tiny.keep_tail = keep_tail
    tiny.compressor = get_compressor(name)
    ids, kept = tiny.encode_prompts(PAIRS)
    for k in (1, 2, 4):
        out = tiny.compressor.embeddings(tiny, ids, k, kept)
        rest = tiny.compressor.embeddings(tiny, [p[: len(p) - c] for p, c in zip(ids, kept)], k)
        batch = tiny.build_batch(ids, k, kept=kept)
        for i, (p, c) in enumerate(zip(ids, kept)):
            assert out[i].shape[0] == tiny.compressor.budget(len(p) - c, k, keep_tail) + c == int(batch.merged_tokens[i])
            if name != "none":
                assert out[i].shape[0] == merged_length(len(p), k, keep_tail, c)
            span = tiny.embed(torch.tensor(p[len(p) - c :], dtype=torch.long))
            assert torch.equal(out[i][out[i].shape[0] - c :], span)  # untouched
            torch.testing.assert_close(out[i][: out[i].shape[0] - c], rest[i], rtol=0, atol=0)  # the rest, as a prompt of its own
            torch.testing.assert_close(_real(batch, i), out[i], rtol=0, atol=0)  # what the LM reads


def test_merge_compressor_equals_the_inline_merge_with_a_span(tiny):
    ids, kept = tiny.encode_prompts(PAIRS)
    for k in (2, 4, 8):
        batch = tiny.build_batch(ids, k, kept=kept)
        for i, e in enumerate(get_compressor("merge").embeddings(tiny, ids, k, kept)):
            torch.testing.assert_close(_real(batch, i), e, rtol=0, atol=0)


def test_compression_counts_the_kept_tokens_as_uncompressed(tiny):
    ids, kept = tiny.encode_prompts(PAIRS)
    targets = tiny.tokenize_targets(TARGETS)
    metrics, plain = KMetrics(0), KMetrics(0)
    for k in (2, 4):
        batch = tiny.build_batch(ids, k, targets, kept=kept)
        assert batch.prompt_tokens.tolist() == [len(p) for p in ids]  # the whole prompt, span included
        assert batch.merged_tokens.tolist() == [merged_length(len(p), k, 0, c) for p, c in zip(ids, kept)]
        nll, counts, _ = tiny.target_nll(batch)
        metrics.update(nll, counts, batch.prompt_tokens, batch.merged_tokens)
        whole = tiny.build_batch(ids, k, targets)
        plain.update(nll, counts, whole.prompt_tokens, whole.merged_tokens)
        n, m = sum(len(p) for p in ids), sum(merged_length(len(p), k, 0, c) for p, c in zip(ids, kept))
        assert metrics.compute()["compression"] == pytest.approx(1 - m / n)
        assert metrics.compute()["compression"] < plain.compute()["compression"]  # keeping costs compression, honestly
        metrics.reset()
        plain.reset()


def test_generate_classify_and_merge_take_pairs(tiny):
    ids, kept = _ids(tiny, PAIRS)
    k = 4
    want = tiny.generate_ids(ids, k=k, max_new_tokens=6, kept=kept)
    batch = tiny.build_batch(ids, k, kept=kept)
    first = tiny.prefill(batch).logits[:, -1].argmax(-1).tolist()
    assert [row[0] for row in want] == first  # generate_ids prefills on exactly that batch
    decoded = [tiny.tokenizer.decode([t for t in row if t != tiny.eos_id], skip_special_tokens=True) for row in want]
    assert tiny.generate(PAIRS, k=k, max_new_tokens=6) == decoded
    unmarked = tiny.build_batch(tiny.tokenize_prompts([m + c for m, c in PAIRS]), k)
    assert not torch.equal(unmarked.merged_tokens, batch.merged_tokens)  # the pair is not the joined string
    labels = ["true", "false"]
    logits = tiny.forward(batch, logits_to_keep=1).logits[:, -1]
    assert torch.equal(tiny.classify(PAIRS, labels, k), logits[:, tiny.label_token_ids(labels)].argmax(-1))
    out = tiny.merge(PAIRS, k=k)
    assert out["kept_tokens"] == kept and out["merged_tokens"] == batch.merged_tokens.tolist()
    for i, e in enumerate(out["prompt_embeds"]):
        assert torch.equal(e, _real(batch, i))


def test_the_tree_marks_exactly_the_question():
    splits = get_benchmark("tree", n_trees=40).load("small")
    examples = splits.train + splits.val + splits.test
    assert examples and TreeBenchmark.version == "2"  # caches of the unmarked examples are not reused
    for e in examples:
        p, c = e.meta["parent"], e.meta["child"]
        assert e.keep == QUESTION.format(parent=p, child=c) == f" Parent: {p}, Child: {c}, Answer: "
        tree = e.prompt[len("Tree: ") : e.prompt.index(", Task:")]
        assert e.prompt == PROMPT.format(tree=tree, parent=p, child=c)  # the prompt itself is unchanged
        assert split_marked(e.prompt, e.keep) == (f"Tree: {tree}, Task: Parent/Child Relationship,", e.keep)
    again = get_benchmark("tree", n_trees=40).load("small")  # from the cache: the mark survives it
    assert [e.keep for e in again.train] == [e.keep for e in splits.train]


def test_commitpack_marks_its_instructions():
    rows = [({"old_contents": "x = 1\n", "new_contents": "x = 2\n", "subject": " Bump x "}, "g"),
            ({"old_contents": "", "new_contents": "y\n", "subject": "Add y"}, "h"),
            ({"old_contents": "a\n\nb", "new_contents": "b\n", "subject": "Drop a"}, "i")]
    for (row, _), e in zip(rows, _Filter(None, None, "truncate", "right").apply(rows)):
        assert e.prompt == format_prompt(row["old_contents"], row["subject"])
        assert e.keep == kept_suffix(row["subject"]) == f"\nInstructions:\n{row['subject'].strip()}\nNew Content:\n"
        assert e.prompt.endswith(e.keep) and e.prompt.count("Instructions:") == 1


def test_keep_marked_turns_examples_into_pairs_and_is_recorded(tiny, tmp_path):
    examples = [Example(prompt=m + k, target=t, keep=k) for (m, k), t in zip(PAIRS, TARGETS)]
    tiny.keep_marked = True
    batch = collate(examples)
    prompts = tiny.example_prompts(batch["prompts"], batch["keeps"])
    assert prompts == [(m, k) if k else m + k for m, k in PAIRS]
    tiny.save(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "ktm.json").read_text())["keep_marked"] is True
    assert KTMModel.from_pretrained(tmp_path / "export").keep_marked is True


def test_the_trainer_reads_the_span_as_the_api_does():
    from ktm.training.module import KTMModule

    examples = [Example(prompt=m + k, target=t, keep=k) for (m, k), t in zip(PAIRS, TARGETS)]
    on, off = KTMModule(base="config:tiny-llama", ks=[1, 4], keep_marked=True), KTMModule(base="config:tiny-llama", ks=[1, 4])
    ids, _, _, kept = on._token_ids(collate(examples))
    assert (ids, kept) == on.model.encode_prompts(PAIRS)
    _, b = on._batch(collate(examples), 4)
    assert torch.equal(b.merged_tokens, on.model.build_batch(ids, 4, kept=kept).merged_tokens)
    ids_off, _, _, kept_off = off._token_ids(collate(examples))
    assert ids_off == off.model.tokenize_prompts([e.prompt for e in examples]) and kept_off == [0] * len(examples)


def test_bad_spans_and_settings_are_one_line(tiny):
    cases = [(lambda: split_marked("abc", "x"), "is not the end of its prompt"),
             (lambda: tiny.encode_prompts([("a", "b", "c")]), "not a string or a (text to merge, text to keep) pair"),
             (lambda: tiny.encode_prompts([("a", 3)]), "not a string or a (text to merge, text to keep) pair"),
             (lambda: tiny.build_batch([[1, 2]], 2, kept=[3]), "cannot keep 3 of them"),
             (lambda: tiny.build_batch([[1, 2]], 2, kept=[1, 1]), "2 kept counts for 1 prompts"),
             (lambda: check_settings([4], keep_marked="yes"), "model.keep_marked must be true or false")]
    for call, message in cases:
        with pytest.raises(KTMError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not the end of its prompt"):
        Example(prompt="abc", target="d", keep="x")


def test_keep_marked_must_match_the_checkpoint():
    s = {"base": "b", "ks": [1, 4], "keep_tail": 0, "compressor": "merge", "keep_marked": True}
    assert checkpoint_mismatch(s, s) is None
    assert checkpoint_mismatch(s, {**s, "keep_marked": False}) == ("keep_marked", True, False)
    old = {k: v for k, v in s.items() if k != "keep_marked"}  # a checkpoint from before the setting: all merged
    assert checkpoint_mismatch(old, {**s, "keep_marked": False}) is None
    assert checkpoint_mismatch(old, s) == ("keep_marked", False, True)


def test_fit_with_keep_marked_keeps_the_question_and_says_so(tmp_path, capsys):
    root = str(tmp_path / "runs")
    tiny = ["--model.base=config:tiny-llama", "--data.benchmark_args={n_trees: 60}", "--data.max_train_examples=16",
            "--data.max_val_examples=8", "--data.max_test_examples=8", "--data.batch_size=8", "--trainer.enable_progress_bar=false"]
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "kept", "--trainer.max_epochs=1", *tiny,
                 "--model.ks=[1,2]", "--data.k_schedule=[2]", "--model.keep_marked=true"]) == 0
    run = tmp_path / "runs" / "tree_k4" / "kept"
    assert json.loads((run / "export" / "ktm.json").read_text())["keep_marked"] is True
    metrics = json.loads((run / "metrics.json").read_text())
    # byte tokens: the question is ~30 of a small tree prompt's ~70, so K=2 saves far less than half
    assert 0.1 < metrics["val"]["k2"]["compression"] < 0.4
    capsys.readouterr()
    assert main(["test", "--config", str(run / "config.yaml"), "--model.keep_marked=false",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 2
    assert "model.keep_marked is True, but the config asks for False" in capsys.readouterr().err


def test_ktm_generate_keeps_the_keep_text_in_tokens(tiny, tmp_path, capsys, monkeypatch):
    tiny.save(tmp_path / "export")
    pair = ("Tree: ab\n+cd, Task: Parent/Child Relationship,", " Parent: ab, Child: cd, Answer: ")
    want = KTMModel.from_pretrained(tmp_path / "export").generate([pair], k=4, max_new_tokens=5)
    seen, real = [], KTMModel.generate
    monkeypatch.setattr(KTMModel, "generate", lambda self, prompts, **kw: seen.append(list(prompts)) or real(self, prompts, **kw))
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(tmp_path / "export"), "--k", "4", "--max-new-tokens", "5", "--keep", pair[1], pair[0]]) == 0
    assert seen == [[pair]] and capsys.readouterr().out == want[0] + "\n"


def test_long_prompts_count_the_span_and_truncation_keeps_it(tiny):
    pair = ("abcdefgh", "xyz")  # 11 byte tokens, 3 kept
    tiny.max_prompt_tokens = 10
    with pytest.raises(KTMError, match="1 of 2 prompts are longer than the limit of 10 tokens \\(longest 11\\)"):
        tiny.check_prompt_lengths([pair, ("abc", "d")])
    tiny.long_prompt_policy = "truncate_left"
    ids, kept = tiny.encode_prompts([pair, ("a", "bcdefghijklm")])
    assert ids[0] == _ids(tiny, [pair])[0][0][-10:] and kept == [3, 10]  # cut from the left: the span survives, or fills it all
    assert tiny.truncated_prompts == 2
