"""Evaluation numbers, defined once.

P-L F1 = 2PL / (P + L): the harmonic mean of task performance P and compression L.
  L = 1 - compressed prompt length / original prompt length (summed over the evaluated prompts)
  P = accuracy for classification, ppl_uncompressed / ppl for perplexity tasks (1.0 = no loss).
Classification always comes with balanced accuracy (mean recall over classes) and the majority-class
baseline, because tree labels are very unbalanced (~99% "false" on the largest stage), and with the ROC AUC of the
label scores (macro over classes, one vs rest): how well a K ranks the examples whatever its decision threshold,
so a K that only decides worse is told apart from one that reads worse (docs/results.md, Amazon at K=4).
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC


def pl_f1(performance: float, compression: float) -> float:
    """2PL/(P+L); 0 when both are 0. Paper: acc 0.9838 at K=4 (L=0.75) -> 0.851."""
    if performance + compression <= 0:
        return 0.0
    return 2 * performance * compression / (performance + compression)


def compression_rate(original_tokens: float, compressed_tokens: float) -> float:
    """L = 1 - compressed/original."""
    return 1.0 - compressed_tokens / original_tokens if original_tokens > 0 else 0.0


def ppl_performance(ppl_uncompressed: float, ppl: float) -> float:
    """P for perplexity tasks: ppl_uncompressed / ppl (paper: 1.293/1.391 at K=4 -> P=0.93, F1 0.830)."""
    return ppl_uncompressed / ppl if ppl > 0 else 0.0


def paired_ppl_ratio(nll_a, nll_b, tokens_per_text: int, resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """ppl_a / ppl_b over the same texts scored two ways (each text's summed NLL, equal token counts, as
    `KTMModel.drift` writes them in "nll_per_text"), with a 95% paired bootstrap interval over texts: the
    noise of the text sample, which is what two checkpoints scored on one set of windows differ by.
    "a_better": the share of texts whose NLL is lower under a."""
    a, b = torch.tensor(nll_a, dtype=torch.float64), torch.tensor(nll_b, dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired_ppl_ratio needs the same non-empty texts on both sides, got {a.numel()} and {b.numel()}")
    gap = (a - b) / tokens_per_text  # per text, the mean NLL difference per token
    draws = torch.randint(0, gap.numel(), (resamples, gap.numel()), generator=torch.Generator().manual_seed(seed))
    boot = gap[draws].mean(dim=1).exp().sort().values
    return {"ratio": math.exp(gap.mean().item()), "low": boot[int(0.025 * (resamples - 1))].item(),
            "high": boot[int(0.975 * (resamples - 1))].item(), "a_better": (a < b).double().mean().item(),
            "texts": gap.numel()}


class SumMetric(Metric):
    """Sums of named quantities, synced across processes (DDP) by torchmetrics."""

    full_state_update = False

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        for n in names:
            self.add_state(n, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, **values) -> None:
        for n, v in values.items():
            setattr(self, n, getattr(self, n) + torch.as_tensor(v, dtype=torch.float64, device=self.device).sum())

    def compute(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.names}


class KMetrics(torch.nn.Module):
    """Everything evaluated for one K on one split."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        if num_classes:
            self.cls = MetricCollection({
                "accuracy": MulticlassAccuracy(num_classes, average="micro"),
                "balanced_accuracy": MulticlassAccuracy(num_classes, average="macro"),
            })
            self.auroc = MulticlassAUROC(num_classes, average="macro", thresholds=None)  # exact: keeps every score
        self.sums = SumMetric(("nll", "target_tokens", "prompt_tokens", "merged_tokens", "adapted_tokens", "examples", "scored",
                               *(f"label{i}" for i in range(num_classes))))

    def update(self, nll, target_tokens, prompt_tokens, merged_tokens, preds=None, labels=None, adapted_tokens=None,
               scores=None) -> None:
        """adapted_tokens: (B,) prompt tokens a budget layout merges at another K than the fixed one (None: 0).
        scores: (B, classes) label probabilities (their argmax is preds), for the ROC AUC."""
        extra = {} if adapted_tokens is None else {"adapted_tokens": adapted_tokens}
        if self.num_classes and labels is not None:
            self.cls.update(preds, labels)
            if scores is not None:
                self.auroc.update(scores.float(), labels)
                extra["scored"] = torch.tensor(float(len(labels)))
            extra.update({f"label{i}": (labels == i).sum() for i in range(self.num_classes)})
        self.sums.update(nll=nll, target_tokens=target_tokens, prompt_tokens=prompt_tokens, merged_tokens=merged_tokens,
                         examples=torch.tensor(float(len(prompt_tokens))), **extra)

    def compute(self) -> dict[str, float]:
        s = {k: float(v) for k, v in self.sums.compute().items()}
        out = {
            "perplexity": math.exp(min(s["nll"] / max(s["target_tokens"], 1.0), 50.0)),
            "compression": compression_rate(s["prompt_tokens"], s["merged_tokens"]),
            "prompt_tokens_mean": s["prompt_tokens"] / max(s["examples"], 1.0),
            "merged_tokens_mean": s["merged_tokens"] / max(s["examples"], 1.0),
            "adapted_share": s["adapted_tokens"] / max(s["prompt_tokens"], 1.0),  # budget policy: tokens off the fixed K
            "examples": s["examples"],
        }
        if self.num_classes:
            out.update({k: float(v) for k, v in self.cls.compute().items()})
            counts = [s[f"label{i}"] for i in range(self.num_classes)]
            out["majority_baseline"] = max(counts) / max(sum(counts), 1.0)
            if s["scored"] and all(counts):  # undefined for a class without examples (no positives to rank)
                out["auroc"] = float(self.auroc.compute())
            out["pl_f1"] = pl_f1(out["accuracy"], out["compression"])
        return out

    def reset(self) -> None:
        self.sums.reset()
        if self.num_classes:
            self.cls.reset()
            self.auroc.reset()


def add_perplexity_f1(per_k: dict[int, dict[str, float]]) -> None:
    """For perplexity tasks: P = ppl(K=1) / ppl(K), measured in the same run (same budget)."""
    if 1 not in per_k:
        return
    ref = per_k[1]["perplexity"]
    for m in per_k.values():
        m["perplexity_uncompressed"] = ref
        m["performance"] = ppl_performance(ref, m["perplexity"])
        m["pl_f1"] = pl_f1(m["performance"], m["compression"])
