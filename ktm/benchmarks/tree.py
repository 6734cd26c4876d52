"""Textualized Tree (K-Token Merging, arXiv 2604.15153): is node P the direct parent of node C?

Each example shows one random tree as text, one node per line in depth-first order, each line
prefixed by '+' repeated once per level below the root:

    ab
    +cd
    ++ef
    +gh

and asks about one ordered pair of distinct nodes (p, c); the answer is "true" iff p is c's direct
parent. Six stages of growing trees form the curriculum (`TREE_STAGES`).

Depth: the number of levels *including the root*. Depth 1 is a lone root, depth 2 a root with
children, so a tree of depth d has lines with 0 .. d-1 '+'. (Counting edges instead would make
x3large's smallest full tree 1+3+9+27+81 = 121 nodes against a 150-node budget, so the budget would
cut almost every tree; counting levels gives 40 .. 156 nodes, and the budget bites only rarely.)

Generation rules (per tree, with its own seeded RNG):
- nodes are expanded breadth-first; a node above the last level draws its number of children
  uniformly from [min_children, max_children], the root from [max(1, min_children), max_children] so
  every tree has at least one parent/child pair to ask about;
- the node budget `max_nodes` is never exceeded: once it runs out, the remaining draws are cut, so a
  node may end with fewer than `min_children` children only in a tree that holds exactly `max_nodes`;
- names are distinct two-letter lowercase strings (676 possible, enough for 150 nodes).

Questions are all n·(n-1) ordered pairs of a tree's nodes, or a seeded uniform sample of
`max_pairs_per_tree` of them (the label mix is then the natural one in expectation). The labels are
very unbalanced on big trees: a tree of n nodes has n-1 true pairs out of n·(n-1), so x3large is about
99% "false"; `info` reports the per-split counts and majority baseline, and `balanced_train=True`
down-samples the train split to equal classes.
"""

from __future__ import annotations

import logging
import random
import string
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from ktm.benchmarks.common import Benchmark, Example, Splits, balance, label_counts, register, split_by_group, stable_hash
from ktm.errors import KTMError

log = logging.getLogger("ktm")

# The paper's stages, easiest first. Keys: max_depth (levels incl. root), max_nodes, min_children,
# max_children.
TREE_STAGES: dict[str, dict[str, int]] = {
    "small": {"max_depth": 2, "max_nodes": 3, "min_children": 0, "max_children": 2},
    "xsmall": {"max_depth": 3, "max_nodes": 5, "min_children": 0, "max_children": 2},
    "medium": {"max_depth": 3, "max_nodes": 10, "min_children": 0, "max_children": 3},
    "xmedium": {"max_depth": 4, "max_nodes": 15, "min_children": 1, "max_children": 3},
    "large": {"max_depth": 4, "max_nodes": 30, "min_children": 1, "max_children": 3},
    "x3large": {"max_depth": 4, "max_nodes": 150, "min_children": 3, "max_children": 5},
}

DEPTH_DEFINITION = "levels including the root (depth 1 = root only, depth 2 = root + children)"

# Every distinct two-letter lowercase name, in a fixed order so sampling from it is reproducible.
NAMES: tuple[str, ...] = tuple(a + b for a in string.ascii_lowercase for b in string.ascii_lowercase)

# The question is the prompt's kept span (Example.keep; in tokens with model.keep_marked). It starts at the
# space before "Parent", where byte-level BPE tokenizers split the text anyway, so the pair (the rest, the
# question) tokenizes exactly as the whole prompt does (checked on SmolLM2's tokenizer).
QUESTION = " Parent: {parent}, Child: {child}, Answer: "
PROMPT = "Tree: {tree}, Task: Parent/Child Relationship," + QUESTION

DEFAULT_N_TREES = 4000  # the paper's size for "small"; generation of every stage stays in seconds
# x3large trees average ~85 nodes (~7,100 ordered pairs, up to 22,350 at 150 nodes); 4000 of them
# uncapped would be ~28M examples of ~500 characters each. 32 pairs per tree keeps the largest
# stage near 128k examples (~70 MB cached) and leaves small/xsmall (at most 20 pairs) untouched.
DEFAULT_MAX_PAIRS_PER_TREE = 32

# Above this many nodes in the worst case, generation takes long enough to deserve a progress bar.
_PROGRESS_MIN_NODES = 50_000


@dataclass(frozen=True)
class Tree:
    """A generated tree, nodes in breadth-first order: parent[i] is the index of i's parent (-1 for the
    root, index 0) and level[i] its level (0 for the root)."""

    names: tuple[str, ...]
    parent: tuple[int, ...]
    level: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.names]
        for i, p in enumerate(self.parent):
            if p >= 0:
                kids[p].append(i)
        return kids

    def depth(self) -> int:
        return max(self.level) + 1

    def serialise(self) -> str:
        """One node per line, depth-first (children in generation order), '+' once per level."""
        kids = self.children()
        lines: list[str] = []
        stack = [0]
        while stack:
            i = stack.pop()
            lines.append("+" * self.level[i] + self.names[i])
            stack.extend(reversed(kids[i]))  # reversed so the first child is visited first
        return "\n".join(lines)


def generate_tree(rng: random.Random, max_depth: int, max_nodes: int, min_children: int, max_children: int) -> Tree:
    """Draw one tree under the rules in the module docstring."""
    parent = [-1]
    level = [0]
    i = 0
    # Breadth-first so a budget cut only trims the deepest, last-visited level rather than starving
    # whole subtrees the way a depth-first expansion would.
    while i < len(parent):
        if level[i] + 1 < max_depth:
            low = max(1, min_children) if i == 0 else min_children
            k = min(rng.randint(low, max_children), max_nodes - len(parent))
            parent.extend([i] * k)
            level.extend([level[i] + 1] * k)
        i += 1
    names = rng.sample(NAMES, len(parent))
    return Tree(tuple(names), tuple(parent), tuple(level))


def _pair_indices(rng: random.Random, n: int, cap: int | None) -> list[int]:
    """Indices into the n·(n-1) ordered pairs of distinct nodes: all, or a sorted uniform sample of `cap`."""
    total = n * (n - 1)
    if cap is None or total <= cap:
        return list(range(total))
    return sorted(rng.sample(range(total), cap))


def _pair(index: int, n: int) -> tuple[int, int]:
    # Pair index = a·(n-1) + r, where r enumerates the n-1 nodes other than a.
    a, r = divmod(index, n - 1)
    return a, (r if r < a else r + 1)


@register
class TreeBenchmark(Benchmark):
    """Textualized Tree parent/child classification, six curriculum stages.

    Options (all enter the data cache key, defaults included):
      n_trees: trees per stage, an int for every stage or a {stage: int} mapping (stages missing from
        the mapping get DEFAULT_N_TREES). Default 4000.
      test_fraction, val_fraction: share of trees (not examples) held out. Default 0.1 each.
      max_pairs_per_tree: cap on questions per tree, a seeded uniform sample of its ordered pairs;
        None keeps all of them. Default 32 (only stages from medium up are affected).
      balanced_train: down-sample the train split to equal true/false counts. Val/test always keep
        the natural distribution. Default False.
    """

    name = "tree"
    task = "classification"
    labels = ("true", "false")
    stages = tuple(TREE_STAGES)
    version = "2"  # 2: examples mark the question as their kept span (Example.keep)

    def __init__(
        self,
        seed: int = 0,
        n_trees: int | dict[str, int] = DEFAULT_N_TREES,
        test_fraction: float = 0.1,
        val_fraction: float = 0.1,
        max_pairs_per_tree: int | None = DEFAULT_MAX_PAIRS_PER_TREE,
        balanced_train: bool = False,
    ):
        _check_options(n_trees, test_fraction, val_fraction, max_pairs_per_tree, balanced_train)
        # Stored resolved (defaults included) so a change of default invalidates old caches.
        super().__init__(
            seed,
            n_trees=dict(n_trees) if isinstance(n_trees, dict) else n_trees,
            test_fraction=test_fraction,
            val_fraction=val_fraction,
            max_pairs_per_tree=max_pairs_per_tree,
            balanced_train=balanced_train,
        )

    def trees_for(self, stage: str) -> int:
        n = self.options["n_trees"]
        return n.get(stage, DEFAULT_N_TREES) if isinstance(n, dict) else n

    def trees(self, stage: str) -> list[Tree]:
        """The stage's trees, tree i from its own RNG so it does not depend on n_trees or other stages."""
        params = _stage_params(stage)
        n = self.trees_for(stage)
        quiet = n * params["max_nodes"] < _PROGRESS_MIN_NODES
        out = []
        # disable=None lets tqdm hide itself when stderr is not a terminal (logs, CI).
        for i in tqdm(range(n), desc=f"tree {stage}: generating", unit="tree", disable=True if quiet else None):
            out.append(generate_tree(self._rng("tree", stage, i), **params))
        return out

    def build(self, stage: str) -> Splits:
        params = _stage_params(stage)
        o = self.options
        trees = self.trees(stage)
        width = len(str(max(len(trees) - 1, 0)))
        examples: list[Example] = []
        pairs_total = 0
        for i, tree in enumerate(trees):
            tree_id = f"{stage}-{i:0{width}d}"
            text = tree.serialise()
            n = len(tree)
            pairs_total += n * (n - 1)
            for index in _pair_indices(self._rng("pairs", stage, i), n, o["max_pairs_per_tree"]):
                a, b = _pair(index, n)
                p, c = tree.names[a], tree.names[b]
                label = "true" if tree.parent[b] == a else "false"
                examples.append(
                    Example(
                        prompt=PROMPT.format(tree=text, parent=p, child=c),
                        keep=QUESTION.format(parent=p, child=c),
                        target=label,
                        label=label,
                        group=tree_id,
                        meta={"stage": stage, "parent": p, "child": c, "tree_id": tree_id},
                    )
                )

        train, val, test = split_by_group(examples, o["test_fraction"], o["val_fraction"], stable_hash(f"tree/split/{self.seed}/{stage}"))
        natural_train = label_counts(train)
        if o["balanced_train"]:
            train = balance(train, stable_hash(f"tree/balance/{self.seed}/{stage}"))
            if not train:
                log.warning("tree %s: balanced_train left no train examples (one label is absent)", stage)

        parts = {"train": train, "val": val, "test": test}
        sizes = [len(t) for t in trees]
        info: dict[str, Any] = {
            "source": "generated",
            "label_counts": {s: label_counts(v) for s, v in parts.items()},
            "majority_baseline": {s: _majority(v) for s, v in parts.items()},
            "trees": {s: len({e.group for e in v}) for s, v in parts.items()},
            "train_label_counts_before_balance": natural_train,
            "generator": {
                **params,
                "depth": DEPTH_DEFINITION,
                "n_trees": len(trees),
                "max_pairs_per_tree": o["max_pairs_per_tree"],
                "balanced_train": o["balanced_train"],
                "nodes": {"min": min(sizes), "mean": round(sum(sizes) / len(sizes), 2), "max": max(sizes)},
                "depth_max_seen": max(t.depth() for t in trees),
                "pairs_before_cap": pairs_total,
                "examples": len(examples),
            },
        }
        return Splits(train=train, val=val, test=test, info=info)

    def _rng(self, purpose: str, stage: str, index: int) -> random.Random:
        # A private generator per (purpose, seed, stage, tree): never the global `random` state.
        return random.Random(stable_hash(f"tree/{purpose}/{self.seed}/{stage}/{index}"))


def _stage_params(stage: str) -> dict[str, int]:
    if stage not in TREE_STAGES:
        raise KTMError(f"benchmark 'tree' has no stage {stage!r}", f"use one of: {', '.join(TREE_STAGES)}")
    return TREE_STAGES[stage]


def _majority(examples: list[Example]) -> dict[str, Any]:
    """Accuracy of always answering the most frequent label of this split (None for an empty split)."""
    counts = label_counts(examples)
    if not counts:
        return {"label": None, "accuracy": None}
    label = max(sorted(counts), key=lambda k: counts[k])
    return {"label": label, "accuracy": counts[label] / len(examples)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(n_trees: Any, test_fraction: Any, val_fraction: Any, max_pairs_per_tree: Any, balanced_train: Any) -> None:
    fix = "check data.benchmark_args for the tree benchmark"
    counts = n_trees.values() if isinstance(n_trees, dict) else [n_trees]
    if isinstance(n_trees, dict) and set(n_trees) - set(TREE_STAGES):
        raise KTMError(f"tree: n_trees names unknown stage(s) {sorted(set(n_trees) - set(TREE_STAGES))}", f"use stages from: {', '.join(TREE_STAGES)}")
    if not all(_is_int(c) and c >= 1 for c in counts):
        raise KTMError(f"tree: n_trees must be a positive int or a {{stage: positive int}} mapping, got {n_trees!r}", fix)
    for name, f in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 <= f < 1:
            raise KTMError(f"tree: {name} must be a number in [0, 1), got {f!r}", fix)
    if test_fraction + val_fraction >= 1:
        raise KTMError(f"tree: test_fraction + val_fraction = {test_fraction + val_fraction} leaves no train trees", "keep their sum below 1")
    if max_pairs_per_tree is not None and not (_is_int(max_pairs_per_tree) and max_pairs_per_tree >= 1):
        raise KTMError(f"tree: max_pairs_per_tree must be a positive int or null, got {max_pairs_per_tree!r}", fix)
    if not isinstance(balanced_train, bool):
        raise KTMError(f"tree: balanced_train must be true or false, got {balanced_train!r}", fix)
