"""What every benchmark shares, written once: the example record, the benchmark interface, keyed data
caches, group-wise splitting and balanced sampling.

A benchmark module (tree.py, amazon.py, commitpack.py) subclasses `Benchmark`, implements `build()`
and registers itself with `@register`. Everything else (caching, splitting, prompts in batches,
scoring) is done here or by the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ktm.errors import KTMError
from ktm.io import read_json, read_jsonl, verify, write_json, write_jsonl

log = logging.getLogger("ktm")

Task = Literal["classification", "perplexity"]
DATA_DIR = Path(os.environ.get("KTM_DATA", "data"))


@dataclass
class Example:
    """One prompt/answer pair.

    prompt: the text that is merged K-to-1.  target: the answer text, kept as normal tokens (the loss
    is only on it).  label: the class name for classification tasks (equals target there), None for
    perplexity tasks.  group: the unit of splitting (tree id, product id, repo/file) so no group is in
    both train and test.  meta: anything the benchmark wants to keep (stage, source, ids).
    keep: the end of `prompt` that must not be merged (the tree's question, commitpack's instructions), ""
    for none. The prompt stays whole; with `model.keep_marked` the model reads it as the pair
    (prompt without keep, keep) and keeps that span in tokens (KTMModel.example_prompts).
    """

    prompt: str
    target: str
    label: str | None = None
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    keep: str = ""

    def __post_init__(self) -> None:
        if self.keep and not self.prompt.endswith(self.keep):
            raise ValueError(f"Example.keep {self.keep[:40]!r} is not the end of its prompt")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**{k: d[k] for k in ("prompt", "target", "label", "group", "meta", "keep") if k in d})


@dataclass
class Splits:
    train: list[Example]
    val: list[Example]
    test: list[Example]
    info: dict[str, Any] = field(default_factory=dict)  # source actually used, counts, drops, ...


REGISTRY: dict[str, type["Benchmark"]] = {}


def register(cls: type["Benchmark"]) -> type["Benchmark"]:
    REGISTRY[cls.name] = cls
    return cls


def get_benchmark(name: str, **kwargs) -> "Benchmark":
    import ktm.benchmarks  # noqa: F401  (imports every benchmark module so they register)

    if name not in REGISTRY:
        raise KTMError(f"unknown benchmark {name!r}", f"use one of: {', '.join(sorted(REGISTRY))}")
    try:
        return REGISTRY[name](**kwargs)
    except TypeError as exc:
        raise KTMError(f"bad options for benchmark {name!r}: {exc}", "check the data.benchmark_args section of your config") from None


class Benchmark:
    """Base class. Subclasses set the class attributes and implement `build(stage)`.

    name: registry key used in configs (`data.benchmark: tree`).
    task: "classification" (scored by accuracy over `labels`) or "perplexity" (scored on target tokens).
    labels: the class names, in a fixed order (classification only); each is the exact target text.
    stages: data stages of the curriculum, easiest first (one stage "all" when there is no curriculum).
    version: bump when the produced data changes, so old caches are rebuilt, never reused (also when its
      examples start marking a kept span, Example.keep: a cache from before would silently mark none).
    """

    name: ClassVar[str] = ""
    task: ClassVar[Task] = "classification"
    labels: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[tuple[str, ...]] = ("all",)
    version: ClassVar[str] = "1"

    def __init__(self, seed: int = 0, **options: Any):
        self.seed = seed
        self.options = options

    # -- to implement -------------------------------------------------------------------------
    def build(self, stage: str) -> Splits:
        """Produce train/val/test for one stage. Must be deterministic given (seed, options)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def cache_key(self, stage: str) -> dict[str, Any]:
        """Everything that determines the data; a cache is reused only when all of it matches."""
        return {"benchmark": self.name, "version": self.version, "stage": stage, "seed": self.seed, "options": self.options}

    def cache_path(self, stage: str) -> Path:
        key = json.dumps(self.cache_key(stage), sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return DATA_DIR / self.name / f"{stage}-{digest}"

    def load(self, stage: str, use_cache: bool = True) -> Splits:
        """Return the splits of `stage`, from the cache when its key matches, else built and cached."""
        if stage not in self.stages:
            raise KTMError(f"benchmark {self.name!r} has no stage {stage!r}", f"use one of: {', '.join(self.stages)}")
        folder = self.cache_path(stage)
        meta_file = folder / "meta.json"
        if use_cache and meta_file.exists():
            try:
                meta = read_json(meta_file, "data cache")
                if meta.get("key") == json.loads(json.dumps(self.cache_key(stage), sort_keys=True, default=str)):
                    parts = {s: [Example.from_dict(r) for r in read_jsonl(verify(folder / f"{s}.jsonl", "data cache") )] if meta["counts"][s] else [] for s in ("train", "val", "test")}
                    return Splits(**parts, info=meta.get("info", {}))
                log.warning("data cache %s was made by other settings; rebuilding it", folder)
            except KTMError as exc:
                log.warning("data cache %s is unusable (%s); rebuilding it", folder, exc)
        splits = self.build(stage)
        for s in ("train", "val", "test"):
            rows = [e.to_dict() for e in getattr(splits, s)]
            if rows:
                write_jsonl(folder / f"{s}.jsonl", rows)
        counts = {s: len(getattr(splits, s)) for s in ("train", "val", "test")}
        write_json(meta_file, {"key": self.cache_key(stage), "counts": counts, "info": splits.info})
        return splits


# -- helpers every benchmark uses ------------------------------------------------------------------


def stable_hash(text: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16)


def split_by_group(
    examples: list[Example], test_fraction: float, val_fraction: float, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Deterministic split where each `group` lands in exactly one of train/val/test."""
    groups = sorted({e.group for e in examples})
    rng = random.Random(seed)
    rng.shuffle(groups)
    n = len(groups)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 and n > 2 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 and n > 2 else 0
    test_g, val_g = set(groups[:n_test]), set(groups[n_test : n_test + n_val])
    train = [e for e in examples if e.group not in test_g and e.group not in val_g]
    val = [e for e in examples if e.group in val_g]
    test = [e for e in examples if e.group in test_g]
    return train, val, test


def balance(examples: list[Example], seed: int, max_per_label: int | None = None) -> list[Example]:
    """Down-sample every label to the size of the rarest one (or `max_per_label`), shuffled."""
    by_label: dict[str | None, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    if len(by_label) < 2:
        return list(examples)
    n = min(len(v) for v in by_label.values())
    if max_per_label is not None:
        n = min(n, max_per_label)
    rng = random.Random(seed)
    out = [e for label in sorted(by_label, key=str) for e in rng.sample(by_label[label], n)]
    rng.shuffle(out)
    return out


def label_counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in examples:
        counts[str(e.label)] = counts.get(str(e.label), 0) + 1
    return counts
