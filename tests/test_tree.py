"""Textualized Tree benchmark: generator rules, labels, prompt format, splits, determinism, caching."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ktm.benchmarks.common as common
from ktm.benchmarks.common import Example, get_benchmark
from ktm.benchmarks.tree import TREE_STAGES, TreeBenchmark, generate_tree
from ktm.errors import KTMError

PROMPT_RE = re.compile(r"\ATree: (?P<tree>.*), Task: Parent/Child Relationship, Parent: (?P<p>[a-z]{2}), Child: (?P<c>[a-z]{2}), Answer: \Z", re.S)
LINE_RE = re.compile(r"\A(\+*)([a-z]{2})\Z")


def parse(text: str) -> tuple[dict[str, str | None], dict[str, int]]:
    """Independent reader of the serialised form: {node: parent or None}, {node: level}."""
    parent: dict[str, str | None] = {}
    level: dict[str, int] = {}
    path: list[str] = []  # path[d] = the latest node seen at level d
    for line in text.split("\n"):
        m = LINE_RE.match(line)
        assert m, f"bad line {line!r}"
        d, name = len(m.group(1)), m.group(2)
        assert name not in parent, f"duplicate name {name}"
        assert d <= len(path), f"line {line!r} skips a level"
        assert (d == 0) == (not parent), "exactly the first line is the root"
        del path[d:]
        parent[name] = path[-1] if path else None
        level[name] = d
        path.append(name)
    return parent, level


def check_tree(text: str, params: dict[str, int]) -> None:
    parent, level = parse(text)
    n = len(parent)
    assert 2 <= n <= params["max_nodes"]
    assert max(level.values()) + 1 <= params["max_depth"]
    kids = {v: 0 for v in parent}
    for p in parent.values():
        if p is not None:
            kids[p] += 1
    root = next(v for v, p in parent.items() if p is None)
    assert kids[root] >= 1
    for v, k in kids.items():
        assert k <= params["max_children"]
        if level[v] + 1 == params["max_depth"]:
            assert k == 0, "the last level has no children"
        elif k < params["min_children"]:
            assert n == params["max_nodes"], "min_children may only be cut by the node budget"


def bench(**kw) -> TreeBenchmark:
    kw.setdefault("seed", 0)
    return TreeBenchmark(**kw)


def tree_text(example: Example) -> str:
    m = PROMPT_RE.match(example.prompt)
    assert m, example.prompt
    return m.group("tree")


@pytest.mark.parametrize("stage", list(TREE_STAGES))
def test_generator_respects_stage_parameters(stage):
    params = TREE_STAGES[stage]
    trees = [generate_tree(random.Random(i), **params) for i in range(400)]
    for t in trees:
        check_tree(t.serialise(), params)
        assert len(set(t.names)) == len(t)
    # The ranges are used, not just bounded: the deepest level is reached and sizes vary.
    assert max(t.depth() for t in trees) == params["max_depth"]
    assert len({len(t) for t in trees}) > 1
    if params["max_nodes"] <= 30:
        assert max(len(t) for t in trees) == params["max_nodes"]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), stage=st.sampled_from(list(TREE_STAGES)))
def test_generator_rules_hold_for_any_seed(seed, stage):
    t = generate_tree(random.Random(seed), **TREE_STAGES[stage])
    text = t.serialise()
    check_tree(text, TREE_STAGES[stage])
    parent, _ = parse(text)
    # The text encodes exactly the generated parent relation.
    assert parent == {t.names[i]: (t.names[p] if p >= 0 else None) for i, p in enumerate(t.parent)}


def test_serialisation_example():
    from ktm.benchmarks.tree import Tree

    t = Tree(names=("ab", "cd", "gh", "ef"), parent=(-1, 0, 0, 1), level=(0, 1, 1, 2))
    assert t.serialise() == "ab\n+cd\n++ef\n+gh"


def test_x3large_budget_and_min_children_are_compatible():
    # Depth counts levels incl. the root: with 3..5 children the tree holds 40..156 nodes before the
    # 150 budget, so the budget is respected and rarely has to cut min_children.
    p = TREE_STAGES["x3large"]
    assert 1 + 3 + 9 + 27 <= p["max_nodes"] < 1 + 5 + 25 + 125
    sizes = [len(generate_tree(random.Random(i), **p)) for i in range(300)]
    assert 40 <= min(sizes) and max(sizes) <= 150


@pytest.mark.parametrize("stage", ["small", "medium", "large"])
def test_labels_prompt_and_meta_match_the_tree(stage):
    s = bench(n_trees=30, max_pairs_per_tree=None).build(stage)
    by_tree: dict[str, list[Example]] = {}
    for e in s.train + s.val + s.test:
        m = PROMPT_RE.match(e.prompt)
        assert m, e.prompt
        text, p, c = m.group("tree"), m.group("p"), m.group("c")
        assert e.prompt == f"Tree: {text}, Task: Parent/Child Relationship, Parent: {p}, Child: {c}, Answer: "
        parent, _ = parse(text)
        check_tree(text, TREE_STAGES[stage])
        assert p != c and p in parent and c in parent
        assert e.label == e.target == ("true" if parent[c] == p else "false")
        assert e.label in TreeBenchmark.labels
        assert e.meta == {"stage": stage, "parent": p, "child": c, "tree_id": e.group}
        by_tree.setdefault(e.group, []).append(e)
    assert len(by_tree) == 30
    # Uncapped: every ordered pair of distinct nodes is asked exactly once, all on the same tree text.
    for exs in by_tree.values():
        texts = {tree_text(e) for e in exs}
        assert len(texts) == 1
        names = list(parse(texts.pop())[0])
        assert sorted((e.meta["parent"], e.meta["child"]) for e in exs) == sorted((a, b) for a in names for b in names if a != b)


def test_pair_cap_samples_distinct_pairs_and_keeps_trees_whole():
    capped = bench(n_trees=20, max_pairs_per_tree=25).build("large")
    full = bench(n_trees=20, max_pairs_per_tree=None).build("large")
    full_pairs: dict[str, set] = {}
    for e in full.train + full.val + full.test:
        full_pairs.setdefault(e.group, set()).add((e.meta["parent"], e.meta["child"], e.label))
    seen: dict[str, list] = {}
    for e in capped.train + capped.val + capped.test:
        seen.setdefault(e.group, []).append((e.meta["parent"], e.meta["child"], e.label))
    assert seen.keys() == full_pairs.keys()  # the cap does not change which trees exist
    for g, pairs in seen.items():
        assert len(pairs) == min(25, len(full_pairs[g]))
        assert len(set(pairs)) == len(pairs)
        assert set(pairs) <= full_pairs[g]
    assert capped.info["generator"]["max_pairs_per_tree"] == 25


def test_pair_cap_keeps_natural_label_rate():
    # Uniform sampling of pairs: the capped true rate matches the uncapped one in expectation.
    full = bench(n_trees=300, max_pairs_per_tree=None, test_fraction=0, val_fraction=0).build("large")
    capped = bench(n_trees=300, max_pairs_per_tree=20, test_fraction=0, val_fraction=0).build("large")

    def rate(ex):
        return sum(e.label == "true" for e in ex) / len(ex)

    # A tree of n nodes has n-1 true pairs of n(n-1): rate 1/n. With the cap, tree t contributes
    # min(cap, n(n-1)) pairs, each true with probability 1/n.
    nodes: dict[str, set] = {}
    for e in full.train:
        nodes.setdefault(e.group, set()).update((e.meta["parent"], e.meta["child"]))
    sizes = [len(v) for v in nodes.values()]
    weights = [min(20, n * (n - 1)) for n in sizes]
    expected = sum(w / n for w, n in zip(weights, sizes)) / sum(weights)
    assert abs(rate(capped.train) - expected) < 0.02
    assert rate(capped.train) > rate(full.train)  # small trees weigh more once big ones are capped


def test_split_is_disjoint_by_tree():
    s = bench(n_trees=200, test_fraction=0.2, val_fraction=0.1).build("xsmall")
    groups = {name: {e.group for e in getattr(s, name)} for name in ("train", "val", "test")}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert len(groups["train"] | groups["val"] | groups["test"]) == 200
    assert (len(groups["test"]), len(groups["val"])) == (40, 20)
    assert s.info["trees"] == {"train": 140, "val": 20, "test": 40}
    # each tree id names the stage and carries exactly one tree text
    texts: dict[str, set] = {}
    for e in s.train + s.val + s.test:
        assert e.group.startswith("xsmall-") and e.meta["tree_id"] == e.group
        texts.setdefault(e.group, set()).add(tree_text(e))
    assert all(len(t) == 1 for t in texts.values())


def test_deterministic_and_seed_dependent():
    a = bench(seed=3, n_trees=50).build("medium")
    b = bench(seed=3, n_trees=50).build("medium")
    c = bench(seed=4, n_trees=50).build("medium")
    for name in ("train", "val", "test"):
        assert [e.to_dict() for e in getattr(a, name)] == [e.to_dict() for e in getattr(b, name)]
    assert a.info == b.info
    trees_a = {tree_text(e) for e in a.train + a.val + a.test}
    trees_c = {tree_text(e) for e in c.train + c.val + c.test}
    assert len(trees_a & trees_c) < 5  # a few tiny trees may coincide by chance, most must not
    # Generation never touches the global RNG.
    random.seed(123)
    state = random.getstate()
    bench(n_trees=5).build("small")
    assert random.getstate() == state


def test_tree_i_does_not_depend_on_n_trees():
    few = TreeBenchmark(seed=1, n_trees=10).trees("xmedium")
    many = TreeBenchmark(seed=1, n_trees=40).trees("xmedium")
    assert few == many[:10]
    assert TreeBenchmark(seed=1, n_trees=10).trees("large") != few  # stages draw different trees


def test_balanced_train():
    plain = bench(n_trees=200).build("medium")
    bal = bench(n_trees=200, balanced_train=True).build("medium")
    counts = bal.info["label_counts"]["train"]
    assert counts["true"] == counts["false"] > 0
    assert sum(e.label == "true" for e in bal.train) == sum(e.label == "false" for e in bal.train)
    # only train is resampled: the natural distribution stays in val/test
    assert [e.to_dict() for e in bal.val] == [e.to_dict() for e in plain.val]
    assert [e.to_dict() for e in bal.test] == [e.to_dict() for e in plain.test]
    assert plain.info["label_counts"]["test"]["false"] > 2 * plain.info["label_counts"]["test"]["true"]
    assert bal.info["train_label_counts_before_balance"] == plain.info["label_counts"]["train"]
    assert {e.group for e in bal.train} <= {e.group for e in plain.train}


def test_x3large_imbalance_is_reported():
    s = bench(n_trees=60, max_pairs_per_tree=200).build("x3large")
    info = s.info
    assert info["source"] == "generated"
    for name in ("train", "val", "test"):
        counts = info["label_counts"][name]
        total = sum(counts.values())
        assert total == len(getattr(s, name)) > 0
        assert counts["false"] / total > 0.97
        assert info["majority_baseline"][name]["label"] == "false"
        assert info["majority_baseline"][name]["accuracy"] == pytest.approx(counts["false"] / total)
    g = info["generator"]
    assert {k: g[k] for k in TREE_STAGES["x3large"]} == TREE_STAGES["x3large"]
    assert g["n_trees"] == 60 and g["max_pairs_per_tree"] == 200
    assert g["nodes"]["max"] <= 150 and g["depth_max_seen"] == 4
    json.dumps(info)  # must be storable in the cache as is


def test_small_default_generation_is_fast():
    t0 = time.perf_counter()
    s = TreeBenchmark().build("small")
    assert time.perf_counter() - t0 < 5
    assert s.info["generator"]["n_trees"] == 4000
    assert len(s.train) > len(s.test) > 0


def test_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "DATA_DIR", tmp_path)
    b = get_benchmark("tree", seed=2, n_trees={"small": 40, "x3large": 3}, max_pairs_per_tree=None, balanced_train=True)
    first = b.load("small")
    assert b.cache_path("small").is_relative_to(tmp_path)
    assert (b.cache_path("small") / "meta.json").exists()

    calls = []
    real_build = TreeBenchmark.build

    def counting_build(self, stage):
        calls.append((stage, dict(self.options)))
        return real_build(self, stage)

    monkeypatch.setattr(TreeBenchmark, "build", counting_build)
    # Same settings through a fresh instance (as a new process would make it): served from the cache.
    again = get_benchmark("tree", seed=2, n_trees={"small": 40, "x3large": 3}, max_pairs_per_tree=None, balanced_train=True).load("small")
    assert calls == []
    for name in ("train", "val", "test"):
        assert [e.to_dict() for e in getattr(again, name)] == [e.to_dict() for e in getattr(first, name)]
    assert again.info == first.info

    # Any option or the seed differing: a new cache, built afresh.
    for kw in ({"seed": 3}, {"balanced_train": False}, {"max_pairs_per_tree": 4}, {"n_trees": 41}, {"test_fraction": 0.2}):
        opts = {"seed": 2, "n_trees": {"small": 40, "x3large": 3}, "max_pairs_per_tree": None, "balanced_train": True, **kw}
        other = get_benchmark("tree", **opts)
        assert other.cache_path("small") != b.cache_path("small")
        other.load("small")
    assert len(calls) == 5
    # Defaults are part of the key: omitting an option equals passing its default.
    assert TreeBenchmark().cache_key("small") == TreeBenchmark(n_trees=4000, max_pairs_per_tree=32).cache_key("small")


def test_options_round_trip_through_json():
    b = TreeBenchmark(seed=5, n_trees={"small": 7}, test_fraction=0.25, val_fraction=0.0, max_pairs_per_tree=None, balanced_train=True)
    restored = TreeBenchmark(seed=b.seed, **json.loads(json.dumps(b.options)))
    assert restored.cache_key("small") == b.cache_key("small")
    assert restored.trees_for("small") == 7 and restored.trees_for("large") == 4000


@pytest.mark.parametrize(
    "kw",
    [
        {"n_trees": 0},
        {"n_trees": "10"},
        {"n_trees": {"huge": 5}},
        {"test_fraction": 1.0},
        {"val_fraction": -0.1},
        {"test_fraction": 0.6, "val_fraction": 0.5},
        {"max_pairs_per_tree": 0},
        {"balanced_train": "yes"},
    ],
)
def test_bad_options_are_user_errors(kw):
    with pytest.raises(KTMError):
        TreeBenchmark(**kw)


def test_unknown_option_and_stage_are_user_errors():
    with pytest.raises(KTMError, match="bad options"):
        get_benchmark("tree", n_tree=5)
    with pytest.raises(KTMError, match="no stage"):
        TreeBenchmark().build("tiny")
    assert TreeBenchmark.stages == ("small", "xsmall", "medium", "xmedium", "large", "x3large")
