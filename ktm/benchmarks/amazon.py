"""Amazon review sentiment (positive/negative), the paper's classification benchmark.

Two sources, one protocol (prompt `Review: {text}, Label:`, target = label text, splits that never put
one product in two splits):

hub      The paper's data: `raw/review_categories/<Category>.jsonl` of the hub dataset repository
         McAuley-Lab/Amazon-Reviews-2023, read with the generic `json` builder of `datasets` (the repo's
         loading script cannot run on datasets>=4). Label: positive if rating >= 3.5, else negative.
         Products (`parent_asin`) are split test/val/train by fraction, then test is capped at 50,000
         reviews and train is a seeded 10% subsample, as in the paper.
offline  No hub: the Hu & Liu (2004) Amazon review sentences with the mean sentiment of 20 raters
         (Hutto & Gilbert 2014), shipped inside the vaderSentiment 3.3.2 sdist on PyPI. Label: positive
         if the mean score > 0, negative if < 0; sentences scored exactly 0 carry no label and are
         dropped (counted in info["drops"]). Exact duplicate sentences are kept once, so an identical
         text cannot sit in train and test. The 3,708 sentences come from 300 reviews of 5 products;
         ids are `<review>_<sentence>` and the reviews are numbered in contiguous product blocks (read
         from the texts, see HU_LIU_PRODUCTS), so the product is a lookup of the review number.
         With 5 products the split is 1 product test, 1 val, 3 train (offline_group="review" splits
         reviews 20/20/60 instead: more even sizes, but the same product then appears in every split).

source="auto" uses the hub (or a cache built from it) and falls back to offline with a WARNING when the
hub cannot be reached; info["source"] says which one was used.

The pieces both sentiment benchmarks share (prompt, labels, group split with caps and subsampling,
duplicate removal, balancing and info) live in sentiment.py (`SentimentBenchmark`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Any, Iterable

from ktm import fetch
from ktm.benchmarks.common import Splits, register
from ktm.benchmarks.sentiment import (
    SPLITS, SentimentBenchmark, check_fraction, check_size, first_occurrences, make_example, pick_rows,
)
from ktm.errors import KTMError

log = logging.getLogger("ktm")

# -- hub source ------------------------------------------------------------------------------------
HUB_REPO = "McAuley-Lab/Amazon-Reviews-2023"
HUB_FILE = "raw/review_categories/{category}.jsonl"
RATING_THRESHOLD = 3.5  # rating >= 3.5 is positive (the paper's rule; ratings are 1.0..5.0)

# -- offline source: vaderSentiment 3.3.2 sdist -> hutto_ICWSM_2014.tar.gz -> the Amazon snippets ---
VADER_VERSION = "3.3.2"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
HUTTO_MEMBER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
HUTTO_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
SNIPPETS_MEMBER = "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt"
SNIPPETS_SHA256 = "11a9807a0974a2506a2d3b4851eaf69b3d6d20688ce4923adda2312a4f6dd6c2"
# Last review number of each product block. Read from the sentences: every block names its product
# (apex/dvd, canon g3, nikon coolpix 4300, nokia 6610/phone, creative zen xtra), and the Canon block
# (99-143) has exactly the 45 reviews Hu & Liu list for the Canon G3. Review numbers 120-124, 290, 291,
# 293 and 294 do not occur in the file.
HU_LIU_PRODUCTS = (
    (98, "apex-ad2600-dvd-player"),
    (143, "canon-g3"),
    (175, "nikon-coolpix-4300"),
    (215, "nokia-6610"),
    (309, "creative-nomad-jukebox-zen-xtra"),
)
OFFLINE_TEST_FRACTION = OFFLINE_VAL_FRACTION = 0.2  # of the groups: 1 of 5 products each


class HubUnreachable(KTMError):
    """The hub could not be contacted (no network, HF_HUB_OFFLINE); source="auto" falls back on it."""


def rating_label(rating: float) -> str:
    return "positive" if rating >= RATING_THRESHOLD else "negative"


def score_label(score: float, min_abs_score: float = 0.0) -> str | None:
    """Sign of a rater score; None (no label) when |score| <= min_abs_score, so 0 is never labelled."""
    if abs(score) <= min_abs_score:
        return None
    return "positive" if score > 0 else "negative"


# -- hub access --------------------------------------------------------------------------------------

_NETWORK_ERROR_NAMES = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
                        "ProxyError", "RemoteProtocolError", "OfflineModeIsEnabled", "ConnectionError"}


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_FALLBACK_WARNED: set[str] = set()  # hub files whose offline fallback was already logged


def _is_unreachable(exc: BaseException) -> bool:
    """True when the failure (or anything in its cause chain) is a network failure or offline mode."""
    return any(
        isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)) or type(e).__name__ in _NETWORK_ERROR_NAMES
        for e in _causes(exc)
    )


def _is_not_found(exc: BaseException) -> bool:
    names = {"RepositoryNotFoundError", "EntryNotFoundError", "RevisionNotFoundError", "DatasetNotFoundError",
             "RemoteEntryNotFoundError", "DataFilesNotFoundError", "EmptyDatasetError"}
    return any(isinstance(e, FileNotFoundError) or type(e).__name__ in names for e in _causes(exc))


def _offline_mode() -> bool:
    """HF_HUB_OFFLINE (or the older HF_DATASETS_OFFLINE) as set now; the libraries read it at import."""
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


@register
class Amazon(SentimentBenchmark):
    """Options (defaults in the signature):

    source          "auto" (hub, else offline with a warning) | "hub" | "offline".
    balanced_train  down-sample train to equal label counts (both sources).
    Hub only: category, hub_repo, hub_file (path inside the repo, `{category}` is filled in), hub_root (a
      local folder laid out like the hub repo, replacing `hf://datasets/<hub_repo>`), hf_cache_dir (the
      datasets cache, default the user's), test_fraction / val_fraction (of the products), test_size /
      val_size (caps, reviews), train_fraction (seeded subsample of the training products' reviews).
    Offline only: offline_group "product" | "review", min_abs_score (sentences with |mean score| <= it
      are dropped; 0 drops only the unlabelled zeros).
    """

    name = "amazon"
    version = "2"  # 2: examples mark the label cue as their kept span (sentiment.KEEP)
    HUB_OPTIONS = ("category", "hub_repo", "hub_file", "hub_root", "hf_cache_dir", "test_fraction",
                   "val_fraction", "test_size", "val_size", "train_fraction")
    OFFLINE_OPTIONS = ("offline_group", "min_abs_score")

    def __init__(
        self,
        seed: int = 0,
        source: str = "auto",
        balanced_train: bool = False,
        category: str = "Amazon_Fashion",
        hub_repo: str = HUB_REPO,
        hub_file: str = HUB_FILE,
        hub_root: str | None = None,
        hf_cache_dir: str | None = None,
        test_fraction: float = 0.1,
        val_fraction: float = 0.02,
        test_size: int | None = 50_000,
        val_size: int | None = 5_000,
        train_fraction: float = 0.1,
        offline_group: str = "product",
        min_abs_score: float = 0.0,
    ):
        if source not in ("auto", "hub", "offline"):
            raise KTMError(f"amazon: unknown source {source!r}", "use auto, hub or offline")
        if offline_group not in ("product", "review"):
            raise KTMError(f"amazon: unknown offline_group {offline_group!r}", "use product or review")
        check_fraction("test_fraction", test_fraction)
        check_fraction("val_fraction", val_fraction, 1.0 - test_fraction)
        check_fraction("train_fraction", train_fraction, share=True)
        check_fraction("min_abs_score", min_abs_score, 4.0)
        check_size("test_size", test_size)
        check_size("val_size", val_size)
        super().__init__(
            seed, source=source, balanced_train=balanced_train, category=category, hub_repo=hub_repo,
            hub_file=hub_file, hub_root=None if hub_root is None else str(hub_root),
            hf_cache_dir=None if hf_cache_dir is None else str(hf_cache_dir), test_fraction=test_fraction,
            val_fraction=val_fraction, test_size=test_size, val_size=val_size, train_fraction=train_fraction,
            offline_group=offline_group, min_abs_score=min_abs_score,
        )

    # -- caching: keyed by the source actually used ---------------------------------------------------
    def cache_key(self, stage: str) -> dict[str, Any]:
        """Only the options of the source in use (plus source itself) determine the data; where the
        datasets library keeps its own cache does not."""
        key = super().cache_key(stage)
        src = self.options["source"]
        unused = self.OFFLINE_OPTIONS if src == "hub" else self.HUB_OPTIONS if src == "offline" else ()
        key["options"] = {k: v for k, v in self.options.items() if k not in unused and k != "hf_cache_dir"}
        return key

    def _as(self, source: str) -> "Amazon":
        return type(self)(seed=self.seed, **{**self.options, "source": source})

    def load(self, stage: str, use_cache: bool = True) -> Splits:
        """source="auto" delegates to the hub variant (whose cache needs no network) and, if the hub is
        unreachable, to the offline variant; the "auto" data is never cached under a key of its own, so
        an offline fallback cannot later pass for hub data."""
        if self.options["source"] != "auto":
            return super().load(stage, use_cache)
        try:
            return self._as("hub").load(stage, use_cache)
        except HubUnreachable as exc:
            self._warn_fallback(exc)
            return self._as("offline").load(stage, use_cache)

    def build(self, stage: str) -> Splits:
        source = self.options["source"]
        if source == "hub":
            return self._build_hub()
        if source == "offline":
            return self._build_offline()
        try:
            return self._build_hub()
        except HubUnreachable as exc:
            self._warn_fallback(exc)
            return self._build_offline()

    def _warn_fallback(self, exc: Exception) -> None:
        # once per hub file and process: fit's and test's data setup both load, and a repeated line reads
        # like a second, different problem
        if self.hub_location() in _FALLBACK_WARNED:
            return
        _FALLBACK_WARNED.add(self.hub_location())
        log.warning(
            "amazon: the hub is unreachable (%s); using the OFFLINE Hu & Liu review sentences instead of the "
            "paper's Amazon Reviews 2023 (set data.benchmark_args.source: hub to make this an error)",
            exc.problem if isinstance(exc, KTMError) else exc,
        )

    # -- hub -----------------------------------------------------------------------------------------
    def hub_location(self) -> str:
        o = self.options
        path = o["hub_file"].format(category=o["category"])
        if o["hub_root"] is not None:
            return str(Path(o["hub_root"]).expanduser().resolve() / path)
        return f"hf://datasets/{o['hub_repo']}/{path}"

    def _read_hub(self):
        where = self.hub_location()
        if self.options["hub_root"] is None and _offline_mode():
            raise HubUnreachable(f"cannot read {where}: HF_HUB_OFFLINE is set", "unset it, or use source: offline")
        import datasets  # heavy import, only needed on this path

        try:
            return datasets.load_dataset("json", data_files=where, split="train", cache_dir=self.options["hf_cache_dir"])
        except Exception as exc:  # noqa: BLE001  (the library raises many types; classify them into one-line errors)
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if _is_unreachable(exc):
                raise HubUnreachable(f"cannot reach the hub for {where} ({detail})",
                                     "check the network (or HF_ENDPOINT), or use source: offline") from None
            if _is_not_found(exc):
                raise KTMError(f"amazon: {where} was not found ({detail})",
                               "check data.benchmark_args category / hub_file / hub_root / hub_repo") from None
            raise KTMError(f"amazon: could not load {where} ({detail})",
                           "check that the file is JSON Lines with rating/text/parent_asin fields") from None

    def _build_hub(self) -> Splits:
        o = self.options
        ds = self._read_hub()
        missing = [c for c in ("rating", "text") if c not in ds.column_names]
        product_col = "parent_asin" if "parent_asin" in ds.column_names else "asin" if "asin" in ds.column_names else None
        if missing or product_col is None:
            raise KTMError(f"amazon: {self.hub_location()} lacks field(s) {', '.join(missing or ['parent_asin/asin'])}",
                           "point hub_file at an Amazon Reviews 2023 review file (raw/review_categories/*.jsonl)")
        import pyarrow as pa
        import pyarrow.compute as pc

        # Arrow columns, so a file of millions of reviews never becomes Python dicts: ratings and products
        # of every row are needed for the split, texts only of the rows that are kept.
        table = ds.data
        ratings = table.column("rating").to_pylist()
        products = table.column(product_col).to_pylist()
        if product_col == "parent_asin" and "asin" in ds.column_names:
            asins = table.column("asin").to_pylist()
            products = [p or a for p, a in zip(products, asins)]  # a review with no parent is its own product
        text_col = table.column("text")
        blank = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(text_col)), 0), True).to_pylist()
        drops = {"no_rating": 0, "no_product": 0, "empty_text": 0}
        keep = []
        for i, (r, p, b) in enumerate(zip(ratings, products, blank)):
            reason = "no_rating" if r is None else "no_product" if not p else "empty_text" if b else None
            if reason:
                drops[reason] += 1
            else:
                keep.append(i)
        rows = pick_rows([products[i] for i in keep], self.seed, o["test_fraction"], o["val_fraction"],
                         caps={"test": o["test_size"], "val": o["val_size"]}, train_fraction=o["train_fraction"])
        parts = {}
        for s in SPLITS:
            idx = [keep[j] for j in rows[s]]
            texts = text_col.take(pa.array(idx, type=pa.int64())).to_pylist()
            parts[s] = [make_example(t.strip(), rating_label(float(ratings[i])), products[i], rating=float(ratings[i]), row=i)
                        for i, t in zip(idx, texts)]
        info = {
            "source": "hub",
            "dataset": f"Amazon Reviews 2023 {o['category']} ({self.hub_location()})",
            "rows": len(ratings),
            "drops": drops,
            "unused": {"split_caps_and_train_fraction": len(keep) - sum(len(r) for r in rows.values())},
            "label_rule": f"positive if rating >= {RATING_THRESHOLD}",
            "group": "product (parent_asin)",
        }
        return self.finish(parts, info)

    # -- offline -------------------------------------------------------------------------------------
    def _build_offline(self) -> Splits:
        o = self.options
        rows = read_hu_liu()
        drops = {"zero_score": 0, "duplicate_text": 0}
        labelled = []
        for rid, score, text in rows:
            label = score_label(score, o["min_abs_score"])
            if label is None:
                drops["zero_score"] += 1
            else:
                labelled.append((rid, score, text, label))
        keep = first_occurrences([r[2] for r in labelled])
        drops["duplicate_text"] = len(labelled) - len(keep)
        labelled = [labelled[i] for i in keep]
        products = [hu_liu_product(rid) for rid, *_ in labelled]
        groups = products if o["offline_group"] == "product" else [f"review-{rid.split('_')[0]}" for rid, *_ in labelled]
        picked = pick_rows(groups, self.seed, OFFLINE_TEST_FRACTION, OFFLINE_VAL_FRACTION)
        parts = {
            s: [make_example(labelled[i][2], labelled[i][3], groups[i], id=labelled[i][0], score=labelled[i][1],
                             product=products[i]) for i in picked[s]]
            for s in SPLITS
        }
        info = {
            "source": "offline",
            "dataset": "Hu & Liu (2004) Amazon review sentences with Hutto & Gilbert (2014) ratings "
            f"(vaderSentiment=={VADER_VERSION} sdist)",
            "rows": len(rows),
            "drops": drops,
            "label_rule": f"positive if mean rater score > 0, negative if < 0, dropped if |score| <= {o['min_abs_score']}",
            "group": o["offline_group"],
            "products": {s: sorted({e.meta["product"] for e in parts[s]}) for s in SPLITS},
        }
        return self.finish(parts, info)


def hu_liu_product(review_id: str) -> str:
    """Product of a Hu & Liu snippet id `<review>_<sentence>` (see HU_LIU_PRODUCTS)."""
    review = int(review_id.split("_")[0])
    for last, product in HU_LIU_PRODUCTS:
        if review <= last:
            return product
    raise KTMError(f"Hu & Liu snippet id {review_id!r} is past the known products", "the pinned file changed; report this")


def read_hu_liu() -> list[tuple[str, float, str]]:
    """(id, mean score in [-4, 4], sentence) rows of the Amazon snippets, downloaded once and verified."""
    sdist = fetch.pypi_file("vaderSentiment", VADER_VERSION, VADER_SDIST_SHA256, source=True)
    folder = Path(fetch.CACHE_DIR) / "hutto_ICWSM_2014"
    inner = fetch.extract_member(sdist, HUTTO_MEMBER, folder / "hutto_ICWSM_2014.tar.gz", HUTTO_SHA256)
    path = fetch.extract_member(inner, SNIPPETS_MEMBER, folder / Path(SNIPPETS_MEMBER).name, SNIPPETS_SHA256)
    out = []
    # ASCII with CRLF line ends; split on "\n" only (str.splitlines would also split on rare control chars)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != 3 or not re.fullmatch(r"\d+_\d+", fields[0]):
            raise KTMError(f"{path} line {lineno} is not 'id<TAB>score<TAB>text'", "delete the cache folder and retry")
        out.append((fields[0], float(fields[1]), fields[2].strip()))
    return out
