"""CommitPackFT code editing (K-Token Merging, arXiv 2604.15153): given a file and a commit subject,
produce the file after the commit. Scored by perplexity on the new file only.

Prompt format (`format_prompt`, the paper's layout; the target is the new file, verbatim):

    Edit the code below as the instructions say and output the complete new file.
    Old Content:
    <old file>
    Instructions:
    <commit subject>
    New Content:

Each heading is on its own line; a newline is added after the old file only when it lacks one.
The instructions and the "New Content:" cue end the prompt: they are its kept span (`kept_suffix`,
Example.keep; in tokens with model.keep_marked), from the newline before "Instructions:", where the
tokenizer splits anyway. The first line is the same in every prompt and comes first, so it is merged.

Sources (option `source`):
- "hub": `data/<language>/data.jsonl` of `bigcode/commitpackft`, read with the generic `json` builder
  of `datasets` (datasets>=4 no longer runs the repository's loading script). One file, so the split
  is ours: a seeded test set of `test_size` examples (paper: 5,600), then val from the rest, both by
  whole groups (first listed repository + file path), so successive states of one file never sit on
  both sides. `hub_root` replaces the `hf://datasets/<repo>` prefix with a local folder laid out like
  the hub repository (tests, mirrors); the code path is the same.
- "jsonl": `data_dir` holding train.jsonl + test.jsonl, or explicit `train_file` (+ `test_file`).
  Rows need subject, old_contents, new_contents; repo/repos, path/new_file/old_file, commit and license
  are optional. Without a test file, test is carved from train like the hub split.
  Group = repo + path. The shared set (shared/data/commits) was split by commit upstream, so its test
  file shares files with train (42 of its 49 test files); we keep that test file as published, so our
  numbers stay comparable, and report the overlap in info["test_groups_in_train"], and how many test
  targets train holds verbatim (as a commit's old or new file) in info["test_targets_in_train"]. Val is carved from
  train by group, so val never shares a file with train.
- "auto" (default): the hub when it answers, else jsonl, with a WARNING that names the reason. The
  decision is taken once per instance and enters the cache key, so a cache built from the fallback is
  never reused for hub data.

Long inputs (counted in info, never silent; sizes count UTF-8 bytes, see text_size): `max_new_chars`
drops examples whose target is longer (a truncated target would teach the model a file that does not
exist). `max_old_chars` either drops the example (`long_policy="drop"`) or cuts the old file at a line
boundary (`"truncate"`). The cut is from the end by default (`truncate_side="right"`, keeping the head): the target starts with the head
of the new file, so the kept old head lines up with the first target tokens the rest is conditioned
on, and a file's head holds the imports and definitions the rest refers to. `truncate_side="left"`
keeps the end of the file instead. Rows whose old and new contents are equal are dropped (counted).
`train_max_chars` lets train alone take longer rows: those the caps dropped that fit this larger cap (old and
new file each) join train, unless their file is in val (or in a test split we carved), so val and test stay the
same examples and a run on more, longer training commits is compared on the same val (info["train_extra"]).

Rows of the same schema can be mined from any local git repository with ktm/benchmarks/commit_miner.py
(`ktm data commits`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Iterable

from ktm.benchmarks import common
from ktm.benchmarks.common import Benchmark, Example, Splits, register
from ktm.errors import KTMError
from ktm.io import read_jsonl, sha256_file, text_size

log = logging.getLogger("ktm")

INSTRUCTION = "Edit the code below as the instructions say and output the complete new file."
PROMPT_HEAD = f"{INSTRUCTION}\nOld Content:\n"

HUB_REPO = "bigcode/commitpackft"
HUB_PATH = "data/{language}/data.jsonl"
PAPER_TEST_SIZE = 5600  # the paper's CommitPackFT test set size
DEFAULT_TEST_FRACTION = 0.1  # test carved from a jsonl source that has no test file
HUB_TIMEOUT_S = 10

REQUIRED = ("subject", "old_contents", "new_contents")
SOURCES = ("auto", "hub", "jsonl")
LONG_POLICIES = ("truncate", "drop")
TRUNCATE_SIDES = ("right", "left")


def format_prompt(old_contents: str, subject: str) -> str:
    """The one place the prompt layout lives (see the module docstring). The target is new_contents."""
    return f"{PROMPT_HEAD}{_ends_line(old_contents)}Instructions:\n{subject.strip()}\nNew Content:\n"


def _ends_line(text: str) -> str:
    return text if text.endswith("\n") or not text else text + "\n"


def _old_file(e: Example) -> str:
    """The old file as format_prompt laid it in e.prompt (ending in a newline unless empty)."""
    return e.prompt[len(PROMPT_HEAD) : len(e.prompt) - len(e.keep) + 1]


def kept_suffix(subject: str) -> str:
    """The end of format_prompt's prompt that stays in tokens with model.keep_marked: the instructions and
    the cue, from the newline before them (the old file's last, or that of "Old Content:")."""
    return f"\nInstructions:\n{subject.strip()}\nNew Content:\n"


def truncate_text(text: str, max_chars: int, side: str = "right") -> str:
    """Cut `text` to at most `max_chars` (as counted by text_size), at a line boundary when one exists
    inside the kept part.

    side="right" removes the end (keeps the head), "left" removes the start (keeps the end).
    """
    raw = text.encode("utf-8")
    if len(raw) <= max_chars:
        return text
    if side == "right":
        cut = raw[:max_chars].decode("utf-8", "ignore")  # "ignore" drops a split multi-byte character
        nl = cut.rfind("\n")
        return cut[: nl + 1] if nl >= 0 else cut
    start = len(raw) - max_chars
    cut = raw[start:].decode("utf-8", "ignore")
    if raw[start - 1 : start] == b"\n":
        return cut  # already at a line start
    nl = cut.find("\n")
    return cut[nl + 1 :] if 0 <= nl < len(cut) - 1 else cut


@register
class CommitPackBenchmark(Benchmark):
    """CommitPackFT code editing, scored by perplexity on the new file.

    Options (all enter the data cache key, defaults included, except hf_cache_dir):
      source: "auto" | "hub" | "jsonl". Default "auto".
      data_dir: folder with train.jsonl and test.jsonl (jsonl source). Default None.
      train_file, test_file: explicit jsonl files instead of data_dir; without test_file the test split
        is carved from train by group. Default None.
      language: CommitPackFT language folder. Default "python".
      hub_repo: Default "bigcode/commitpackft".  hub_path: in-repo file, "{language}" filled in.
        Default "data/{language}/data.jsonl".  hub_revision: branch/tag/commit. Default None (main).
      hub_root: local folder that stands in for hf://datasets/<hub_repo>. Default None.
      hf_cache_dir: `datasets` cache folder. Default None (the datasets default).
      test_size: examples held out for test when we split (hub; jsonl without test file): an int is a
        count, a float in (0, 1) a fraction. Default None = 5600 for the hub, 0.1 for jsonl.
      val_fraction: share of train examples moved to val, by whole groups. Default 0.1.
      max_old_chars, max_new_chars: caps counted in UTF-8 bytes (= characters for ASCII; see text_size),
        None = no cap. Default None.
      long_policy: "truncate" | "drop" for old files over max_old_chars. Default "truncate".
      truncate_side: "right" (keep the head) | "left" (keep the end). Default "right".
      train_max_chars: a larger cap (UTF-8 bytes, old and new file each) under which rows dropped by
        max_old_chars / max_new_chars still join train (never val, nor val's files). Default None.
    """

    name = "commitpack"
    task = "perplexity"
    labels = ()
    version = "4"  # 2: size caps count UTF-8 bytes; 3: examples mark the instructions as their kept span (Example.keep);
    # 4: info counts the test targets train holds verbatim (test_targets_in_train)

    def __init__(
        self,
        seed: int = 0,
        source: str = "auto",
        data_dir: str | None = None,
        train_file: str | None = None,
        test_file: str | None = None,
        language: str = "python",
        hub_repo: str = HUB_REPO,
        hub_path: str = HUB_PATH,
        hub_revision: str | None = None,
        hub_root: str | None = None,
        hf_cache_dir: str | None = None,
        test_size: int | float | None = None,
        val_fraction: float = 0.1,
        max_old_chars: int | None = None,
        max_new_chars: int | None = None,
        long_policy: str = "truncate",
        truncate_side: str = "right",
        train_max_chars: int | None = None,
    ):
        _check_options(source, data_dir, train_file, test_file, test_size, val_fraction, max_old_chars, max_new_chars, long_policy, truncate_side, train_max_chars)
        super().__init__(
            seed,
            source=source,
            data_dir=None if data_dir is None else str(data_dir),
            train_file=None if train_file is None else str(train_file),
            test_file=None if test_file is None else str(test_file),
            language=language,
            hub_repo=hub_repo,
            hub_path=hub_path,
            hub_revision=hub_revision,
            hub_root=None if hub_root is None else str(hub_root),
            hf_cache_dir=None if hf_cache_dir is None else str(hf_cache_dir),
            test_size=test_size,
            val_fraction=val_fraction,
            max_old_chars=max_old_chars,
            max_new_chars=max_new_chars,
            long_policy=long_policy,
            truncate_side=truncate_side,
            train_max_chars=train_max_chars,
        )
        self._resolved: dict[str, Any] | None = None
        self._digests: dict[tuple[str, int, int], str] = {}

    # -- source resolution ------------------------------------------------------------------------
    def hub_data_files(self) -> str:
        """What `datasets` is given: hf://datasets/<repo>[@rev]/<path>, or <hub_root>/<path>."""
        o = self.options
        path = o["hub_path"].format(language=o["language"])
        if o["hub_root"] is not None:
            return f"{Path(o['hub_root']).resolve()}/{path}"
        rev = f"@{o['hub_revision']}" if o["hub_revision"] else ""
        return f"hf://datasets/{o['hub_repo']}{rev}/{path}"

    def jsonl_files(self) -> tuple[Path, Path | None] | None:
        """(train, test or None) for the jsonl source, None when none is configured."""
        o = self.options
        if o["train_file"] is not None:
            return Path(o["train_file"]), None if o["test_file"] is None else Path(o["test_file"])
        if o["data_dir"] is not None:
            return Path(o["data_dir"]) / "train.jsonl", Path(o["data_dir"]) / "test.jsonl"
        return None

    def resolve_source(self) -> dict[str, Any]:
        """Decide once which source this instance uses: {"source", "hub": {...} | None, "fallback_reason"}.

        For "auto" this asks the hub; a failure falls back to jsonl with a WARNING. A hub that answers
        but lacks the file is a configuration error, never a reason to fall back.
        """
        if self._resolved is not None:
            return self._resolved
        requested = self.options["source"]
        if requested == "jsonl":
            self._require_jsonl("source is 'jsonl'")
            self._resolved = {"source": "jsonl", "hub": None, "fallback_reason": None}
            return self._resolved
        hub, reason = self._probe_hub()
        if hub is not None:
            self._resolved = {"source": "hub", "hub": hub, "fallback_reason": None}
        elif requested == "hub":
            raise KTMError(
                f"the CommitPackFT hub file {self.hub_data_files()} is unreachable ({reason})",
                "check the network (or HF_HUB_OFFLINE), set hub_root to a local copy, or use source: jsonl with data_dir",
            )
        else:
            self._require_jsonl(f"the hub is unreachable ({reason})")
            log.warning("commitpack: hub file %s unreachable (%s); using the local jsonl files instead", self.hub_data_files(), reason)
            self._resolved = {"source": "jsonl", "hub": None, "fallback_reason": reason}
        return self._resolved

    def _require_jsonl(self, why: str) -> None:
        if self.jsonl_files() is None:
            raise KTMError(
                f"commitpack needs local data because {why}, but no data_dir or train_file is set",
                "set data.benchmark_args.data_dir to a folder with train.jsonl and test.jsonl (e.g. ../shared/data/commits)",
            )

    def _probe_hub(self) -> tuple[dict[str, Any] | None, str | None]:
        """Return (hub fingerprint, None) when the hub file can be read, else (None, reason)."""
        o = self.options
        path = o["hub_path"].format(language=o["language"])
        if o["hub_root"] is not None:
            root = Path(o["hub_root"])
            if not root.is_dir():
                return None, f"hub_root {root} is not a folder"
            local = root / path
            if not local.is_file():
                raise KTMError(f"hub_root {root} has no {path}", f"lay the folder out like the hub repository {o['hub_repo']} or fix hub_path/language")
            return {"data_files": self.hub_data_files(), "file": self._fingerprint(local)}, None
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        url = huggingface_hub.hf_hub_url(o["hub_repo"], path, repo_type="dataset", revision=o["hub_revision"])
        try:
            meta = huggingface_hub.get_hf_file_metadata(url, timeout=HUB_TIMEOUT_S)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise KTMError(
                f"the hub answered but has no {path} in dataset {o['hub_repo']} ({type(exc).__name__})",
                "check language / hub_path / hub_revision against the repository's file list",
            ) from None
        except Exception as exc:  # noqa: BLE001  (any transport or offline-mode failure means "not reachable")
            return None, f"{type(exc).__name__}: {_one_line(exc)}"
        return {"data_files": self.hub_data_files(), "etag": meta.etag, "commit": meta.commit_hash}, None

    def _fingerprint(self, path: Path) -> dict[str, Any]:
        """Resolved path + size + sha256 (memoised on mtime/size, so an edited file is re-hashed)."""
        p = Path(path).resolve()
        st = p.stat()
        memo = (str(p), st.st_mtime_ns, st.st_size)
        if memo not in self._digests:
            self._digests[memo] = sha256_file(p)
        return {"path": str(p), "size": st.st_size, "sha256": self._digests[memo]}

    def cache_key(self, stage: str) -> dict[str, Any]:
        key = super().cache_key(stage)
        # Where the HF cache lives does not change the data.
        key["options"] = {k: v for k, v in self.options.items() if k != "hf_cache_dir"}
        resolved = self.resolve_source()
        key["source"] = resolved["source"]
        if resolved["source"] == "hub":
            key["hub"] = resolved["hub"]
        else:
            train, test = self.jsonl_files()  # type: ignore[misc]
            # A missing file gets no fingerprint here; build() then reports it via read_jsonl.
            key["data_files"] = [self._fingerprint(p) if p.exists() else {"path": str(p.resolve()), "missing": True} for p in (train, test) if p is not None]
        return key

    # -- building ---------------------------------------------------------------------------------
    def build(self, stage: str) -> Splits:
        resolved = self.resolve_source()
        o = self.options
        info: dict[str, Any] = {
            "source": resolved["source"],
            "requested_source": o["source"],
            "language": o["language"],
            "long_policy": o["long_policy"],
            "truncate_side": o["truncate_side"],
            "max_old_chars": o["max_old_chars"],
            "max_new_chars": o["max_new_chars"],
        }
        if resolved["fallback_reason"]:
            info["fallback_reason"] = resolved["fallback_reason"]
        filt = _Filter(o["max_old_chars"], o["max_new_chars"], o["long_policy"], o["truncate_side"])
        rng = random.Random(self.seed)

        if resolved["source"] == "hub":
            data_files = self.hub_data_files()
            rows = self._load_hub(data_files)
            info["data_files"] = data_files
            info["hub"] = resolved["hub"]
            info["read"] = {"hub": len(rows)}
            examples = filt.apply(_examples(rows, "hub", data_files))
            capped_out = list(filt.too_long)
            published_test = False
            n_test = _size(o["test_size"] if o["test_size"] is not None else PAPER_TEST_SIZE, len(examples))
            pool, test = _carve(examples, n_test, rng, "test")
        else:
            train_path, test_path = self.jsonl_files()  # type: ignore[misc]
            train_rows = read_jsonl(train_path, REQUIRED, "commitpack train file")
            info["data_files"] = {"train": str(train_path.resolve())}
            info["read"] = {"train": len(train_rows)}
            pool = filt.apply(_examples(train_rows, "jsonl", train_path))
            capped_out = list(filt.too_long)  # the train file's rows only: a test row never joins train
            published_test = test_path is not None
            if published_test:
                test_rows = read_jsonl(test_path, REQUIRED, "commitpack test file")
                info["data_files"]["test"] = str(test_path.resolve())
                info["read"]["test"] = len(test_rows)
                test = filt.apply(_examples(test_rows, "jsonl", test_path))
                # The published test split is kept as is; report how many of its files train also has.
                train_groups = {e.group for e in pool}
                info["test_groups_in_train"] = len({e.group for e in test} & train_groups)
            else:
                n_test = _size(o["test_size"] if o["test_size"] is not None else DEFAULT_TEST_FRACTION, len(pool))
                pool, test = _carve(pool, n_test, rng, "test")
                info["test_carved_from_train"] = True

        n_val = _size(o["val_fraction"], len(pool)) if o["val_fraction"] > 0 else 0
        train, val = _carve(pool, n_val, rng, "val")
        if n_val and not val:
            log.warning("commitpack: too few groups to carve a val split; val is empty")
        if o["train_max_chars"] is not None:
            # Files we held out stay out; a published test file already shares files with train (above).
            held_out = {e.group for e in val} | (set() if published_test else {e.group for e in test})
            train, info["train_extra"] = _add_long_train(train, capped_out, held_out, o["train_max_chars"], o["truncate_side"])
        if published_test:
            train_files = {f for e in train for f in (_ends_line(e.target), _old_file(e))}
            info["test_targets_in_train"] = sum(_ends_line(e.target) in train_files for e in test)
        info["dropped"] = filt.dropped
        info["truncated_old"] = filt.truncated
        info["counts"] = {"train": len(train), "val": len(val), "test": len(test)}
        info["groups"] = {s: len({e.group for e in part}) for s, part in (("train", train), ("val", val), ("test", test))}
        log.info("commitpack: %s source, %s, dropped %s, truncated %d", resolved["source"], info["counts"], filt.dropped, filt.truncated)
        return Splits(train, val, test, info)

    def _load_hub(self, data_files: str) -> list[dict]:
        import datasets

        o = self.options
        try:
            ds = datasets.load_dataset("json", data_files=data_files, split="train", cache_dir=o["hf_cache_dir"])
        except Exception as exc:  # noqa: BLE001  (the library's many network/format errors become one line)
            raise KTMError(
                f"could not load {data_files} with datasets ({type(exc).__name__}: {_one_line(exc)})",
                "check the network or hub_root, or use source: jsonl with data_dir",
            ) from None
        missing = [k for k in REQUIRED if k not in ds.column_names]
        if missing:
            raise KTMError(f"{data_files} lacks column(s) {', '.join(missing)}", f"CommitPackFT rows need: {', '.join(REQUIRED)}")
        return list(ds)


class _Filter:
    """Applies the long-input policy and the identical-contents rule, counting everything it does."""

    def __init__(self, max_old: int | None, max_new: int | None, policy: str, side: str):
        self.max_old, self.max_new, self.policy, self.side = max_old, max_new, policy, side
        self.dropped = {"identical": 0, "long_new": 0, "long_old": 0}
        self.truncated = 0
        self.too_long: list[tuple[dict, str]] = []  # the rows dropped for a cap, for train_max_chars

    def apply(self, rows: Iterable[tuple[dict, str]]) -> list[Example]:
        out = []
        for row, group in rows:
            old, new = row["old_contents"], row["new_contents"]
            if old == new:
                self.dropped["identical"] += 1
                continue
            if self.max_new is not None and text_size(new) > self.max_new:
                self.dropped["long_new"] += 1
                self.too_long.append((row, group))
                continue
            truncated = False
            if self.max_old is not None and text_size(old) > self.max_old:
                if self.policy == "drop":
                    self.dropped["long_old"] += 1
                    self.too_long.append((row, group))
                    continue
                old, truncated = truncate_text(old, self.max_old, self.side), True
                self.truncated += 1
            meta = {k: row[k] for k in ("repo", "commit", "path", "license") if row.get(k) is not None}
            meta["old_truncated"] = truncated
            out.append(Example(prompt=format_prompt(old, row["subject"]), target=new, label=None, group=group, meta=meta,
                               keep=kept_suffix(row["subject"])))
        return out


def _add_long_train(train: list[Example], too_long: list[tuple[dict, str]], held_out: set[str], cap: int, side: str) -> tuple[list[Example], dict]:
    """Train plus the capped-out rows that fit `cap`, except those of held-out files; and what was done."""
    fits = _Filter(cap, cap, "drop", side).apply(too_long)
    extra = [e for e in fits if e.group not in held_out]
    info = {"train_max_chars": cap, "added": len(extra), "held_out_file_rows": len(fits) - len(extra), "over_cap": len(too_long) - len(fits)}
    return train + extra, info


def _examples(rows: list[dict], source: str, where: Any) -> Iterable[tuple[dict, str]]:
    """Normalise field names (hub: repos/new_file/old_file) and yield (row, group)."""
    for i, raw in enumerate(rows, 1):
        for k in REQUIRED:
            if not isinstance(raw[k], str):
                raise KTMError(f"{source} data {where} row {i}: field {k} is {type(raw[k]).__name__}, not a string", "every row needs text in subject, old_contents and new_contents")
        repos = raw.get("repo") or raw.get("repos") or ""
        # The hub lists every repository (forks) holding the commit; the first one names the group.
        repo = repos.split(",")[0].strip() if isinstance(repos, str) else ""
        path = raw.get("path") or raw.get("new_file") or raw.get("old_file") or ""
        row = {
            "subject": raw["subject"],
            "old_contents": raw["old_contents"],
            "new_contents": raw["new_contents"],
            "repo": repo or None,
            "path": path or None,
            "commit": raw.get("commit"),
            "license": raw.get("license"),
        }
        # Without a path, identical old files still land together (best we can do).
        group = f"{repo}/{path}" if path else f"{repo}#{common.stable_hash(raw['old_contents'])}"
        yield row, group


def _size(spec: int | float, n: int) -> int:
    """A count (int) or a fraction of n (float); a positive fraction gives at least one example."""
    if isinstance(spec, float):
        return max(1, round(spec * n)) if spec > 0 and n else 0
    return int(spec)


def _carve(examples: list[Example], n: int, rng: random.Random, what: str) -> tuple[list[Example], list[Example]]:
    """Move whole groups, in seeded random order, into a held-out part of at most `n` examples.

    Groups that would overshoot are skipped (one file can have dozens of commits); at least one group
    always stays behind. Returns (rest, held_out). For test, failing to hold anything out is an error.
    """
    if n <= 0:
        return list(examples), []
    sizes: dict[str, int] = {}
    for e in examples:
        sizes[e.group] = sizes.get(e.group, 0) + 1
    if what == "test" and n >= len(examples):
        raise KTMError(f"commitpack: test_size {n} leaves no training data ({len(examples)} examples after filtering)", "lower test_size")
    groups = sorted(sizes)
    rng.shuffle(groups)
    picked: set[str] = set()
    total = 0
    for g in groups:
        if len(picked) >= len(groups) - 1 or total >= n:
            break
        if total + sizes[g] <= n:
            picked.add(g)
            total += sizes[g]
    if not picked and len(groups) > 1:
        picked.add(min(groups, key=lambda g: (sizes[g], g)))
    if not picked and what == "test":
        raise KTMError(f"commitpack: cannot hold out a test split from {len(groups)} group(s)", "give a test_file or more data (different files)")
    return [e for e in examples if e.group not in picked], [e for e in examples if e.group in picked]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def _check_train_cap(cap, max_old, max_new) -> None:
    """train_max_chars (already a positive int or None) must be above a cap that drops rows."""
    if cap is None:
        return
    caps = [c for c in (max_old, max_new) if c is not None]
    if not caps:
        raise KTMError("commitpack: train_max_chars is set but max_old_chars and max_new_chars are not, so no row is capped out",
                       "set max_old_chars / max_new_chars (the caps val and test keep) or remove train_max_chars")
    if cap <= max(caps):
        raise KTMError(f"commitpack: train_max_chars {cap} must exceed max_old_chars / max_new_chars ({max(caps)}) to add any row",
                       "raise data.benchmark_args.train_max_chars or remove it")


def _check_options(source, data_dir, train_file, test_file, test_size, val_fraction, max_old, max_new, policy, side, train_max) -> None:
    if source not in SOURCES:
        raise KTMError(f"commitpack: source {source!r} is not one of {', '.join(SOURCES)}", "set data.benchmark_args.source")
    if data_dir is not None and train_file is not None:
        raise KTMError("commitpack: data_dir and train_file are both set", "give either a data_dir or explicit train_file/test_file")
    if test_file is not None and train_file is None:
        raise KTMError("commitpack: test_file is set without train_file", "give train_file too, or use data_dir")
    if test_size is not None:
        ok = (isinstance(test_size, int) and not isinstance(test_size, bool) and test_size > 0) or (isinstance(test_size, float) and 0 < test_size < 1)
        if not ok:
            raise KTMError(f"commitpack: test_size {test_size!r} must be a positive int (count) or a float in (0, 1)", "fix data.benchmark_args.test_size")
    if not isinstance(val_fraction, (int, float)) or isinstance(val_fraction, bool) or not 0 <= val_fraction < 1:
        raise KTMError(f"commitpack: val_fraction {val_fraction!r} must be in [0, 1)", "fix data.benchmark_args.val_fraction")
    for name, cap in (("max_old_chars", max_old), ("max_new_chars", max_new), ("train_max_chars", train_max)):
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0):
            raise KTMError(f"commitpack: {name} {cap!r} must be a positive int or null", f"fix data.benchmark_args.{name}")
    if policy not in LONG_POLICIES:
        raise KTMError(f"commitpack: long_policy {policy!r} is not one of {', '.join(LONG_POLICIES)}", "fix data.benchmark_args.long_policy")
    if side not in TRUNCATE_SIDES:
        raise KTMError(f"commitpack: truncate_side {side!r} is not one of {', '.join(TRUNCATE_SIDES)}", "fix data.benchmark_args.truncate_side")
    _check_train_cap(train_max, max_old, max_new)

