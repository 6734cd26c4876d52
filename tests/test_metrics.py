"""P-L F1 reproduces the paper's numbers; KMetrics aggregates per K correctly."""

import math

import pytest
import torch

from ktm.metrics import KMetrics, add_perplexity_f1, compression_rate, pl_f1, ppl_performance


def test_pl_f1_paper_values():
    assert pl_f1(0.9838, 0.75) == pytest.approx(0.851, abs=5e-4)  # tree, K=4
    assert pl_f1(ppl_performance(1.293, 1.391), 0.75) == pytest.approx(0.830, abs=5e-4)  # code, K=4
    assert pl_f1(0.0, 0.0) == 0.0
    assert compression_rate(400, 100) == 0.75


def test_kmetrics_classification():
    m = KMetrics(num_classes=2)
    preds, labels = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 1, 0])
    m.update(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2, 2, 2, 2]), torch.tensor([8, 8, 8, 8]),
             torch.tensor([2, 2, 2, 2]), preds, labels)
    out = m.compute()
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert out["majority_baseline"] == pytest.approx(0.5)
    assert out["compression"] == pytest.approx(0.75)
    assert out["perplexity"] == pytest.approx(math.exp(0.5))
    assert out["pl_f1"] == pytest.approx(pl_f1(0.75, 0.75))


def _scored(m: KMetrics, scores: list[list[float]], labels: list[int]) -> dict:
    n = len(labels)
    ones = torch.ones(n)
    p = torch.tensor(scores)
    m.update(ones, ones, 4 * ones, ones, p.argmax(-1), torch.tensor(labels), scores=p)
    return m.compute()


def test_roc_auc_ranks_the_label_scores_whatever_the_decision_threshold():
    """A K whose scores rank every negative below every positive has AUC 1 even when its argmax decides wrongly for
    half of them (a shifted threshold); reversed scores give 0, one tie between classes 0.5 of its pair."""
    m = KMetrics(num_classes=2)
    shifted = [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]]  # P(class 1) rises with the label: argmax says 0 for all
    out = _scored(m, shifted, [0, 0, 1, 1])
    assert out["balanced_accuracy"] == pytest.approx(0.5) and out["auroc"] == pytest.approx(1.0)
    m.reset()
    assert _scored(m, shifted, [1, 1, 0, 0])["auroc"] == pytest.approx(0.0)
    m.reset()
    assert _scored(m, [[0.5, 0.5], [0.5, 0.5]], [0, 1])["auroc"] == pytest.approx(0.5)


def test_roc_auc_is_absent_without_scores_or_with_a_class_missing():
    m = KMetrics(num_classes=2)
    assert "auroc" not in _scored(m, [[0.9, 0.1], [0.8, 0.2]], [0, 0])  # no positives to rank
    m.reset()
    ones = torch.ones(2)
    m.update(ones, ones, 4 * ones, ones, torch.tensor([0, 1]), torch.tensor([0, 1]))  # preds only (older callers)
    assert "auroc" not in m.compute() and m.compute()["accuracy"] == 1.0


def test_perplexity_f1_uses_k1_as_reference():
    per_k = {1: {"perplexity": 1.293, "compression": 0.0}, 4: {"perplexity": 1.391, "compression": 0.75}}
    add_perplexity_f1(per_k)
    assert per_k[4]["pl_f1"] == pytest.approx(0.830, abs=5e-4)
    assert per_k[1]["performance"] == 1.0


def test_line_similarity_and_generation_scores(tiny):
    from ktm.benchmarks.common import Example
    from ktm.training.module import generation_scores, line_similarity

    assert line_similarity("a\nb\nc", "a\nb\nc") == 1.0
    assert line_similarity("a\nb", "x\ny") == 0.0
    assert line_similarity("a\nb\nc\nd", "a\nb\nc\nX") == 0.75
    examples = [Example(prompt="Old Content:\nx = 1\nNew Content:\n", target="x = 2\n"), Example(prompt="abc", target="d")]
    scores = generation_scores(tiny, examples, k=2, max_new_tokens=4)
    assert scores["generated"] == 2.0 and 0.0 <= scores["line_similarity"] <= 1.0 and scores["exact_match"] in (0.0, 0.5, 1.0)


def test_paired_ppl_ratio_is_the_perplexity_ratio_with_a_paired_interval():
    import math

    from ktm.metrics import paired_ppl_ratio

    b = [40.0, 60.0, 50.0, 70.0]  # summed NLL of 16 tokens per text
    same = paired_ppl_ratio(b, b, 16)
    assert (same["ratio"], same["low"], same["high"], same["a_better"]) == (1.0, 1.0, 1.0, 0.0)
    a = [x - 8.0 for x in b]  # half a nat per token lower on every text: a constant gap has no spread
    r = paired_ppl_ratio(a, b, 16)
    assert r["ratio"] == pytest.approx(math.exp(-0.5)) and r["low"] == pytest.approx(r["high"]) == pytest.approx(r["ratio"])
    assert r["a_better"] == 1.0 and r["texts"] == 4
    mixed = paired_ppl_ratio([32.0, 68.0, 42.0, 78.0], b, 16)  # better on two texts, worse on two: the interval spans 1
    assert mixed["low"] < 1.0 < mixed["high"] and mixed["a_better"] == 0.5
    assert paired_ppl_ratio(a, b, 16, seed=1) == paired_ppl_ratio(a, b, 16, seed=1)
    with pytest.raises(ValueError, match="same non-empty texts"):
        paired_ppl_ratio(a[:3], b, 16)
