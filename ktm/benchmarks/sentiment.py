"""What the two sentiment benchmarks share (amazon.py, rotten_tomatoes.py): the paper's prompt and labels,
the split by whole groups with caps and subsampling, duplicate removal, balancing and the split info.

Kept in its own module so neither benchmark imports the other, and a change here is seen to touch both.
Each benchmark keeps its own name and `version` (its cache key): a change here that alters the data
needs a version bump in both.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

from ktm.benchmarks.common import Benchmark, Example, Splits, balance, label_counts, split_by_group
from ktm.errors import KTMError

log = logging.getLogger("ktm")

LABELS = ("positive", "negative")
PROMPT = "Review: {text}, Label:"
# The cue the answer follows, marked as the span that model.keep_marked keeps in tokens (Example.keep). It starts at
# whitespace, where byte-level BPE splits anyway; the comma stays merged, since BPE joins it to a review's last
# punctuation (".," is one token), and a span starting there would tokenize otherwise than the whole prompt.
KEEP = " Label:"
SPLITS = ("train", "val", "test")


def make_example(text: str, label: str, group: str, **meta: Any) -> Example:
    return Example(prompt=PROMPT.format(text=text), target=label, label=label, group=group, meta=meta, keep=KEEP)


def first_occurrences(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of every distinct text (an identical text in train and test
    would be scored on something the model was trained on)."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return keep


def pick_rows(
    groups: Sequence[str],
    seed: int,
    test_fraction: float,
    val_fraction: float,
    caps: dict[str, int | None] | None = None,
    train_fraction: float = 1.0,
) -> dict[str, list[int]]:
    """Row indices of train/val/test: whole groups are assigned by `split_by_group` (a fraction of the
    groups each), then train is subsampled to `train_fraction` and each split cut to its cap, seeded.

    Works on indices so a large hub file only becomes Examples for the rows that are kept.
    """
    # split_by_group looks at nothing but `.group`, and its result depends only on the set of groups,
    # so one stand-in per group gives the same assignment as passing every row.
    stand_ins = [Example("", "", group=g) for g in set(groups)]
    parts = split_by_group(stand_ins, test_fraction, val_fraction, seed)
    where = {e.group: name for name, part in zip(SPLITS, parts) for e in part}
    rows: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, g in enumerate(groups):
        rows[where[g]].append(i)
    # one generator per split, so changing one split's cap does not reshuffle another
    if train_fraction < 1.0:
        n = round(len(rows["train"]) * train_fraction)
        rows["train"] = sorted(random.Random(f"{seed}:train-fraction").sample(rows["train"], n))
    for s, cap in (caps or {}).items():
        if cap is not None and len(rows[s]) > cap:
            rows[s] = sorted(random.Random(f"{seed}:{s}-cap").sample(rows[s], cap))
    return rows


def check_fraction(name: str, value: float, upper: float = 1.0, share: bool = False) -> None:
    """A fraction of the groups is in [0, upper); a share of rows to keep (`share`) is in (0, 1]."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0.0 < value <= 1.0 if share else 0.0 <= value < upper)
    if not ok:
        raise KTMError(f"option {name}={value!r} is out of range", f"use a number in {'(0, 1]' if share else f'[0, {upper})'}")


def check_size(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise KTMError(f"option {name}={value!r} is not a positive whole number", "use a count of examples, or null for no cap")


class SentimentBenchmark(Benchmark):
    """Binary sentiment with the paper's prompt; subclasses produce rows and call `finish`."""

    task = "classification"
    labels = LABELS

    def finish(self, parts: dict[str, list[Example]], info: dict[str, Any]) -> Splits:
        """Balance train if asked, check that no group is in two splits, and record counts/baselines."""
        if self.options["balanced_train"]:
            before = len(parts["train"])
            parts["train"] = balance(parts["train"], self.seed)
            info["unused"] = {**info.get("unused", {}), "balancing": before - len(parts["train"])}
        seen: dict[str, str] = {}
        for s in SPLITS:
            for g in {e.group for e in parts[s]}:
                if seen.setdefault(g, s) != s:
                    raise AssertionError(f"group {g!r} is in both {seen[g]} and {s}")  # a bug, not user error
        info["counts"] = {s: label_counts(parts[s]) for s in SPLITS}
        info["sizes"] = {s: len(parts[s]) for s in SPLITS}
        info["groups"] = {s: len({e.group for e in parts[s]}) for s in SPLITS}
        # the accuracy of always answering the split's most frequent label: the floor to beat
        info["majority_baseline"] = {
            s: (max(c.values()) / len(parts[s]) if parts[s] else None) for s, c in info["counts"].items()
        }
        for s in SPLITS:
            if not parts[s]:
                log.warning("%s: the %s split is empty (%s)", self.name, s, info.get("dataset", "?"))
        return Splits(train=parts["train"], val=parts["val"], test=parts["test"], info=info)
