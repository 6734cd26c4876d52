"""Adaptive K (ktm.policy, model.merge_policy=budget): the layout as pure functions, then a tiny model."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ktm.cli import main
from ktm.errors import KTMError
from ktm.io import write_json
from ktm.model import KTMModel, LoraSettings, merged_length
from ktm.policy import (TokenScores, allocate, budget_runs, moved_tokens, runs_length, runs_teacher_positions,
                        token_surprisal)
from ktm.training.module import KTMModule, step_draw


def _check_cover(runs, n):
    assert sum(t for t, _ in runs) == n and all(t > 0 for t, _ in runs)
    assert all(t % k == 0 for t, k in runs)  # no block is cut short


@pytest.mark.parametrize("n, k, ks, scores, expected", [
    # equal scores, the target among ks: every window at the target, as the fixed layout
    (64, 4, [1, 2, 4, 8], [1.0] * 64, [(64, 4)]),
    # a dense first window goes down to K=2 and the budget it takes comes from two predictable windows at K=8
    (64, 4, [1, 2, 4, 8], [3.0] * 16 + [1.0] * 48, [(16, 2), (16, 4), (32, 8)]),
    # ks {1, 4} at an average of 2: the densest window stays in tokens, then the best next one block by block
    (64, 2, [1, 4], [5.0] * 16 + [1.0] * 48, [(20, 1), (44, 4)]),
    # a leading window of 3 tokens is the fixed layout's head (tokens) and does not adapt
    (67, 4, [1, 2, 4, 8], [3.0] * 19 + [1.0] * 48, [(3, 1), (16, 2), (16, 4), (32, 8)]),
    # ... and without the target among ks, its shortest layout (6 tokens: 2 tokens + a K=4 block)
    (70, 2, [1, 4], [5.0] * 22 + [1.0] * 48, [(2, 1), (4, 4), (20, 1), (44, 4)]),
    # only one K: nothing to choose
    (40, 4, [4], [1.0] * 40, [(40, 4)]),
])
def test_budget_layouts(n, k, ks, scores, expected):
    runs = budget_runs(n, k, ks, 16, scores)
    assert runs == expected
    _check_cover(runs, n)
    assert runs_length(runs) <= merged_length(n, k)


@pytest.mark.parametrize("runs, reference, moved", [
    ([(64, 4)], [(64, 4)], 0),                                # the fixed layout itself
    ([(16, 2), (16, 4), (32, 8)], [(64, 4)], 48),             # the dense window and the two predictable ones
    ([(3, 1), (16, 2), (16, 4), (32, 8)], [(3, 1), (64, 4)], 48),  # a head in tokens in both does not count
    ([(20, 1), (44, 4)], [(64, 2)], 64),                      # every token at another K
])
def test_moved_tokens_counts_the_tokens_merged_at_another_k(runs, reference, moved):
    assert moved_tokens(runs, reference) == moved


def test_the_budget_meets_the_fixed_length_within_one_block_and_keeps_the_tail_in_tokens():
    rng = random.Random(0)
    for _ in range(400):
        ks = rng.choice([[1, 2, 4, 8], [1, 2, 4], [2, 4, 8], [1, 4], [1, 2, 4, 8, 16]])
        k = rng.choice([c for c in ks if c > 1])
        window = max(ks) * rng.choice([1, 2, 4])
        n, keep_tail, kept = rng.randint(1, 300), rng.choice([0, 0, 5]), rng.choice([0, 0, 7])
        tail = min(keep_tail + kept, n)
        scores = [rng.random() * rng.choice([1, 10]) for _ in range(n - tail)]
        runs = budget_runs(n, k, ks, window, scores, keep_tail, kept)
        _check_cover(runs, n)
        if tail:
            assert runs[-1][1] == 1 and runs[-1][0] >= tail  # the tail (and its kept span) stays tokens, never merged
        fixed = merged_length(n, k, keep_tail, kept)
        lead = (n - tail) % window
        _check_denser_merges_less(runs, scores, lead, window)
        if k in ks:  # the leading window is laid out as the fixed layout's head: it cannot overshoot
            step = max(a // b - 1 for a, b in zip(sorted(ks)[1:], sorted(ks)))
            assert fixed - step <= runs_length(runs) <= fixed, (n, k, ks, window, runs)


def _check_denser_merges_less(runs, scores, lead, window):
    """A window of strictly higher mean score never ends at a larger K (its coarsest part, for the one split window)."""
    per_token = [k for t, k in runs for _ in range(t)]
    windows = range((len(scores) - lead) // window)
    mean = [sum(scores[lead + j * window : lead + (j + 1) * window]) / window for j in windows]
    coarsest = [max(per_token[lead + j * window : lead + (j + 1) * window]) for j in windows]
    for i in windows:
        for j in windows:
            if mean[i] > mean[j]:
                assert coarsest[i] <= coarsest[j], (mean, coarsest)


def test_allocation_prefers_the_densest_window_and_spends_the_slack():
    assert allocate([1.0, 9.0, 1.0], [1, 2, 4], 8, 2) == [[(8, 4)], [(8, 2)], [(8, 4)]]
    assert allocate([1.0, 9.0, 1.0], [1, 2, 4], 8, 0) == [[(8, 4)]] * 3
    # not enough slack for a whole window's step: the best window's first blocks
    assert allocate([1.0, 9.0], [1, 4], 8, 3) == [[(8, 4)], [(4, 1), (4, 4)]]


def test_teacher_positions_of_a_mixed_layout_pair_each_block_with_its_last_token():
    # 2 tokens, two K=2 blocks, two K=4 blocks, one kept token, then one target token
    assert runs_teacher_positions([(2, 1), (4, 2), (8, 4), (1, 1)], targets=1) == [0, 1, 3, 5, 9, 13, 14, 15]


@pytest.fixture
def budget():
    torch.manual_seed(0)
    model = KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4, 8], lora=LoraSettings(r=4), merge_policy="budget", segment_tokens=8)
    for enc in model.encoders.values():
        if enc.mlp is not None:
            torch.nn.init.normal_(enc.mlp[-1].weight, std=0.02)
    return model.eval()


class RepeatScores:
    """A token that repeats the one before scores 1, any other 10: windows differ clearly on a random tiny model,
    whose surprisal is nearly flat."""

    score = "surprisal"

    def __call__(self, model, ids):
        return [1.0 if i and t == ids[i - 1] else 10.0 for i, t in enumerate(ids)]


PROMPTS = ["aaaaaaaaaaaaaaaaaaaaaaaa qz7#Lk!pW3@x", "the cat sat on the mat, the cat sat on the mat; Xq9&", "short one"]


def test_a_budget_batch_mixes_ks_and_gives_each_example_its_result_alone(budget):
    budget.token_scores = RepeatScores()
    ids = budget.tokenize_prompts(PROMPTS)
    layouts = budget.layouts(ids, 4)
    assert len({k for runs in layouts for _, k in runs if k > 1}) > 1  # mixed K in one batch
    batch = budget.build_batch(ids, 4, budget.tokenize_targets(["x", "y", "z"]))
    assert batch.merged_tokens.tolist() == [runs_length(r) for r in layouts]
    fixed = budget.layouts(ids, 4, policy="fixed")
    assert batch.adapted_tokens.tolist() == [moved_tokens(r, f) for r, f in zip(layouts, fixed)]
    assert batch.adapted_tokens.sum() > 0 and budget.build_batch(ids, 4, policy="fixed").adapted_tokens is None
    for i, p in enumerate(ids):
        alone = budget.build_batch([p], 4, budget.tokenize_targets([["x", "y", "z"][i]]))
        n = int(alone.attention_mask.sum())
        torch.testing.assert_close(batch.inputs_embeds[i, batch.attention_mask[i].bool()], alone.inputs_embeds[0, -n:])
        assert budget.layouts([p], 4) == [layouts[i]]
    with torch.no_grad():
        logits = budget.target_logits(batch)
        torch.testing.assert_close(logits[0], budget.target_logits(budget.build_batch(ids[:1], 4, budget.tokenize_targets(["x"])))[0],
                                   atol=1e-5, rtol=1e-5)


def test_spread_positions_of_a_budget_layout_are_each_blocks_last_token(budget):
    budget.token_scores, budget.merged_positions = RepeatScores(), "spread"
    ids = budget.tokenize_prompts(PROMPTS)
    targets = budget.tokenize_targets(["x", "y", "z"])
    batch = budget.build_batch(ids, 4, targets)
    for i, runs in enumerate(budget.layouts(ids, 4)):
        real = batch.position_ids[i, batch.attention_mask[i].bool()].tolist()
        assert real == runs_teacher_positions(runs, len(targets[i])) and real[-1] == len(ids[i]) + len(targets[i]) - 1


def test_surprisal_decides_the_layout_and_random_is_another(budget):
    ids = budget.tokenize_prompts(PROMPTS[:1])
    scores = budget.token_scores(budget, ids[0])
    runs = budget.layouts(ids, 4)[0]
    assert runs == budget_runs(len(ids[0]), 4, budget.ks, 8, list(scores))
    torch.testing.assert_close(torch.tensor(list(scores)), token_surprisal(budget, ids[0]))  # the frozen base's
    finite = [x if x != float("inf") else 0.0 for x in scores]
    _check_denser_merges_less(runs, finite, len(ids[0]) % 8, 8)
    random_scores = TokenScores("random")
    assert list(random_scores(budget, ids[0])) == list(random_scores(budget, ids[0]))  # drawn from the content: stable
    assert list(random_scores(budget, ids[0])) != list(scores)
    fixed = budget.build_batch(ids, 4, policy="fixed")
    assert int(fixed.merged_tokens[0]) == merged_length(len(ids[0]), 4)
    assert budget.build_batch(ids, 1).merged_tokens.tolist() == [len(ids[0])]  # K=1 is K=1 under any policy


def test_policy_settings_are_one_clear_line():
    with pytest.raises(KTMError, match=r"model.segment_tokens=12 is not a multiple of K=8"):
        KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4, 8], merge_policy="budget", segment_tokens=12)
    with pytest.raises(KTMError, match="model.merge_policy must be one of fixed, budget"):
        KTMModel.from_base("config:tiny-llama", ks=[4], merge_policy="adaptive")
    with pytest.raises(KTMError, match="compressor 'truncate_tail' has none"):
        KTMModel.from_base("config:tiny-llama", ks=[1, 4], merge_policy="budget", compressor="truncate_tail")
    with pytest.raises(KTMError, match="model.policy_score must be one of"):
        KTMModel.from_base("config:tiny-llama", ks=[1, 4], policy_score="entropy")
    with pytest.raises(KTMError, match=r"model.budget_share must be a number in \[0, 1\]"):
        KTMModule(base="config:tiny-llama", ks=[1, 4], budget_share=2)


def test_the_export_keeps_the_policy_and_serves_it(budget, tmp_path):
    path = budget.save(tmp_path / "export")
    loaded = KTMModel.from_pretrained(path)
    assert (loaded.merge_policy, loaded.segment_tokens, loaded.token_scores.score) == ("budget", 8, "surprisal")
    ids = budget.tokenize_prompts(PROMPTS)
    assert loaded.layouts(ids, 4) == budget.layouts(ids, 4)
    assert loaded.generate_ids(ids, 4, max_new_tokens=3) == budget.generate_ids(ids, 4, max_new_tokens=3)
    meta = json.loads((path / "ktm.json").read_text())
    del meta["merge_policy"], meta["segment_tokens"], meta["policy_score"]  # an export from before the policy
    write_json(path / "ktm.json", meta)  # with its sha256 sidecar, as an old export has
    assert KTMModel.from_pretrained(path).merge_policy == "fixed"


def test_drift_reports_each_policy_and_a_budget_average_the_checkpoint_has_no_encoder_for(budget):
    texts = [f"Text {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs, then rests a while." for i in range(4)]
    out = budget.drift(texts, ks=[3, 4], prefix_tokens=24, continuation_tokens=8, policies=["fixed", "budget"])
    assert [(r["policy"], r["k"]) for r in out["per_k"]] == [("fixed", 4), ("budget", 3), ("budget", 4)]
    for r in out["per_k"]:
        bound = merged_length(25, r["k"])  # 24 tokens after the byte tokenizer's BOS
        assert r["prefix_positions"] <= bound and r["drift"] == pytest.approx(r["ppl_merged"] / r["ppl_uncompressed"] - 1)
    assert {"4", "3:budget", "4:budget"} <= set(out["nll_per_text"])
    with pytest.raises(KTMError, match=r"K=3 is not in this checkpoint's ks"):
        budget.drift(texts, ks=[3], prefix_tokens=24, continuation_tokens=8, policies=["fixed"])


def test_budget_steps_are_a_share_drawn_from_the_step_number():
    draws = [step_draw(s) for s in range(2000)]
    assert draws == [step_draw(s) for s in range(2000)]  # the same on a resumed run
    assert 0.45 < sum(d < 0.5 for d in draws) / len(draws) < 0.55
    m = KTMModule(base="config:tiny-llama", ks=[1, 4], merge_policy="budget", segment_tokens=8, budget_share=0.5)
    assert {m.train_policy(s, 1) for s in range(50)} == {"fixed"}  # K=1 has no layout to choose
    assert {m.train_policy(s, 4) for s in range(50)} == {"fixed", "budget"}
    m1 = KTMModule(base="config:tiny-llama", ks=[1, 4], merge_policy="budget", segment_tokens=8, budget_share=1.0)
    assert {m1.train_policy(s, 4) for s in range(50)} == {"budget"}
    assert {KTMModule(base="config:tiny-llama", ks=[1, 4]).train_policy(s, 4) for s in range(50)} == {"fixed"}


def test_a_tiny_fit_with_the_budget_policy_trains_and_evaluates_by_it(tmp_path, monkeypatch):
    import ktm.benchmarks.common as common

    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    args = ["fit", "--exp", "tree_k4", "--root", str(tmp_path / "runs"), "--run", "bp", "--model.base=config:tiny-llama",
            "--model.ks=[1,2,4]", "--model.merge_policy=budget", "--model.segment_tokens=8", "--data.k_schedule=[2]",
            "--data.benchmark_args={n_trees: 60}", "--data.max_train_examples=16", "--data.max_val_examples=8",
            "--data.max_test_examples=8", "--data.batch_size=4", "--trainer.max_epochs=1", "--trainer.max_time=null",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1"]
    assert main(args) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tree_k4" / "bp"
    acc = EventAccumulator(str(run)).Reload()
    steps = [e.value for e in acc.Scalars("train/budget_step")]
    assert set(steps) == {0.0, 1.0}  # both layouts trained
    assert json.loads((run / "export" / "ktm.json").read_text())["merge_policy"] == "budget"
    val = json.loads((run / "metrics.json").read_text())["val"]
    assert val["k1"]["adapted_share"] == 0.0 and 0.0 <= val["k2"]["adapted_share"] <= 1.0  # written per K


def test_hidden_distillation_aligns_a_budget_layout(budget):
    budget.token_scores = RepeatScores()
    ids = budget.tokenize_prompts(PROMPTS)
    tids = budget.tokenize_targets(["x", "yy", "z"])
    b, b1 = budget.build_batch(ids, 4, tids), budget.build_batch(ids, 1, tids)
    mine, theirs = budget.aligned_positions(ids, 4, [len(t) for t in tids], None, b.inputs_embeds.shape[1], b1.inputs_embeds.shape[1])
    assert len(mine) == int(b.attention_mask.sum()) - len(ids)  # every real position but each first one (the sink)
    assert bool(b.attention_mask[mine[:, 0], mine[:, 1]].all()) and bool(b1.attention_mask[theirs[:, 0], theirs[:, 1]].all())
    tokens = [i for i, (row, col) in enumerate(mine.tolist()) if col >= b.inputs_embeds.shape[1] - len(tids[row])]
    torch.testing.assert_close(b.inputs_embeds[mine[tokens, 0], mine[tokens, 1]], b1.inputs_embeds[theirs[tokens, 0], theirs[tokens, 1]])
