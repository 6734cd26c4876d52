"""CommitPackFT benchmark: jsonl and hub sources, long-input policy, cache keys (the miner: test_commit_miner.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ktm.benchmarks import common, get_benchmark
from ktm.benchmarks.commitpack import INSTRUCTION, CommitPackBenchmark, format_prompt, truncate_text
from ktm.errors import KTMError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commits"
needs_shared = pytest.mark.skipif(not (SHARED / "train.jsonl").exists(), reason=f"shared commit data not found at {SHARED}")


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    # Caches go to a temp folder, never to the repository's data/.
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "cache")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _edit(repo: str, path: str, i: int, old: str | None = None, new: str | None = None) -> dict:
    return {
        "repo": repo,
        "path": path,
        "commit": f"{repo}-{path}-{i}",
        "subject": f"Change number {i} of {path}",
        "old_contents": old if old is not None else f"x = {i}\n",
        "new_contents": new if new is not None else f"x = {i + 1}\n",
    }


def _fixture_dir(tmp_path: Path, n_files: int = 8, per_file: int = 3) -> Path:
    """train.jsonl with n_files groups of per_file edits each, test.jsonl with two other files."""
    d = tmp_path / "commits"
    train = [_edit(f"o/r{f % 2}", f"m{f}.py", i) for f in range(n_files) for i in range(per_file)]
    test = [_edit("o/t", f"t{f}.py", 0) for f in range(2)]
    _write(d / "train.jsonl", train)
    _write(d / "test.jsonl", test)
    return d


# -- prompt format ---------------------------------------------------------------------------------


def test_prompt_format_is_the_papers_layout():
    assert format_prompt("a = 1\n", "  Bump a  ") == (
        f"{INSTRUCTION}\nOld Content:\na = 1\nInstructions:\nBump a\nNew Content:\n"
    )
    # A file without a final newline still leaves "Instructions:" on its own line.
    assert format_prompt("a = 1", "Bump a").count("a = 1\nInstructions:\n") == 1
    assert format_prompt("", "Create it").startswith(f"{INSTRUCTION}\nOld Content:\nInstructions:\n")


def test_test_targets_a_training_commit_holds_verbatim_are_counted(tmp_path):
    train = [_edit("o/a", "a.py", 0, old="a = 0\n", new="a = 1\n"), _edit("o/a", "a.py", 1, old="a = 1", new="a = 2\n"),
             _edit("o/b", "b.py", 0, old="", new="b = 1\n")]
    test = [_edit("o/a", "a.py", 9, old="a = 2\n", new="a = 0"),  # the first training commit's old file (no final newline)
            _edit("o/a", "a.py", 8, old="a = 0\n", new="a = 2\n"),  # the second one's target
            _edit("o/b", "b.py", 9, old="b = 1\n", new="b = 3\n")]  # not in train
    d = tmp_path / "d"
    _write(d / "train.jsonl", train)
    _write(d / "test.jsonl", test)
    info = CommitPackBenchmark(source="jsonl", data_dir=str(d), val_fraction=0).build("all").info
    assert info["test_groups_in_train"] == 2 and info["test_targets_in_train"] == 2


# -- the shared data -------------------------------------------------------------------------------


@needs_shared
def test_shared_jsonl_counts_format_and_group_split():
    bench = CommitPackBenchmark(source="jsonl", data_dir=str(SHARED))
    splits = bench.load("all")
    info = splits.info
    assert info["source"] == "jsonl" and info["read"] == {"train": 717, "test": 72}
    assert len(splits.train) + len(splits.val) == 717 and len(splits.test) == 72
    assert info["counts"] == {"train": len(splits.train), "val": len(splits.val), "test": 72}
    assert info["dropped"] == {"identical": 0, "long_new": 0, "long_old": 0} and info["truncated_old"] == 0
    assert 40 <= len(splits.val) <= 72  # 10% of train, by whole files, never over
    train_groups, val_groups = {e.group for e in splits.train}, {e.group for e in splits.val}
    assert val_groups and not train_groups & val_groups
    # The published test split shares files with train (split by commit upstream); we report it.
    assert info["test_groups_in_train"] == 42
    # 3 of the 12 test commits within the 1200-byte caps have a target that a training commit holds verbatim.
    capped = CommitPackBenchmark(source="jsonl", data_dir=str(SHARED), max_old_chars=1200, max_new_chars=1200, long_policy="drop").build("all")
    assert capped.info["test_groups_in_train"] == 10 and capped.info["test_targets_in_train"] == 3

    by_commit = {r["commit"]: r for r in _rows(SHARED / "train.jsonl") + _rows(SHARED / "test.jsonl")}
    for e in splits.train + splits.val + splits.test:
        row = by_commit[e.meta["commit"]]
        assert e.target == row["new_contents"]
        assert e.prompt == format_prompt(row["old_contents"], row["subject"])
        assert e.group == f"{row['repo']}/{row['path']}" and e.label is None
        assert e.meta["license"] == row["license"] and e.meta["old_truncated"] is False
    # Second load comes from the cache and is the same data.
    again = CommitPackBenchmark(source="jsonl", data_dir=str(SHARED)).load("all")
    assert [e.meta["commit"] for e in again.val] == [e.meta["commit"] for e in splits.val]


@needs_shared
def test_shared_train_max_chars_keeps_val_and_test():
    caps = dict(source="jsonl", data_dir=str(SHARED), max_old_chars=1200, max_new_chars=1200, long_policy="drop")
    base = CommitPackBenchmark(**caps).build("all")
    more = CommitPackBenchmark(**caps, train_max_chars=2000).build("all")
    assert base.info["counts"] == {"train": 113, "val": 13, "test": 12} and more.info["counts"] == {"train": 234, "val": 13, "test": 12}
    assert _commits(more.val) == _commits(base.val) and _commits(more.test) == _commits(base.test)
    assert more.info["train_extra"] == {"train_max_chars": 2000, "added": 121, "held_out_file_rows": 3, "over_cap": 467}


@needs_shared
def test_shared_long_policies_are_counted():
    rows = _rows(SHARED / "train.jsonl") + _rows(SHARED / "test.jsonl")
    cap = 2000
    n_long = sum(len(r["old_contents"]) > cap for r in rows)
    assert n_long > 0
    cut = CommitPackBenchmark(source="jsonl", data_dir=str(SHARED), max_old_chars=cap).build("all")
    assert cut.info["truncated_old"] == n_long and cut.info["dropped"]["long_old"] == 0
    assert sum(len(s) for s in (cut.train, cut.val, cut.test)) == 789
    assert sum(e.meta["old_truncated"] for e in cut.train + cut.val + cut.test) == n_long
    dropped = CommitPackBenchmark(source="jsonl", data_dir=str(SHARED), max_old_chars=cap, long_policy="drop").build("all")
    assert dropped.info["dropped"]["long_old"] == n_long and dropped.info["truncated_old"] == 0
    assert sum(len(s) for s in (dropped.train, dropped.val, dropped.test)) == 789 - n_long


# -- long inputs on a fixture ----------------------------------------------------------------------


def test_truncate_keeps_whole_lines_from_the_chosen_side():
    text = "import os\nimport sys\n\ndef main():\n    pass\n"
    assert truncate_text(text, 25) == "import os\nimport sys\n\n"
    assert truncate_text(text, 25, "left") == "\ndef main():\n    pass\n"  # the partial "ys\n" goes
    assert truncate_text(text, 21, "left") == "def main():\n    pass\n"  # cut already on a line start
    assert truncate_text(text, 20, "left") == "    pass\n"
    assert truncate_text(text, len(text)) == text
    assert truncate_text("x" * 50, 10) == "x" * 10  # no line break inside: hard cut


def test_long_old_truncate_vs_drop_and_long_new_and_identical(tmp_path):
    long_old = "".join(f"line {i}\n" for i in range(40))  # 290 chars
    rows = [
        _edit("o/a", "a.py", 0, old=long_old, new="short\n"),
        _edit("o/b", "b.py", 0, old="a\n", new="n" * 500),  # target over the cap: always dropped
        _edit("o/c", "c.py", 0, old="same\n", new="same\n"),  # no change: dropped
        *[_edit(f"o/r{i}", f"f{i}.py", 0) for i in range(6)],
    ]
    d = tmp_path / "d"
    _write(d / "train.jsonl", rows)
    _write(d / "test.jsonl", [_edit("o/t", "t.py", 0)])

    cut = CommitPackBenchmark(source="jsonl", data_dir=str(d), max_old_chars=100, max_new_chars=200).build("all")
    assert cut.info["dropped"] == {"identical": 1, "long_new": 1, "long_old": 0} and cut.info["truncated_old"] == 1
    ex = next(e for e in cut.train + cut.val if e.meta["path"] == "a.py")
    assert ex.meta["old_truncated"] and "line 0\n" in ex.prompt and "line 39" not in ex.prompt
    assert ex.prompt == format_prompt(truncate_text(long_old, 100), rows[0]["subject"])
    assert ex.target == "short\n"

    left = CommitPackBenchmark(source="jsonl", data_dir=str(d), max_old_chars=100, truncate_side="left").build("all")
    ex = next(e for e in left.train + left.val if e.meta["path"] == "a.py")
    assert "line 39\n" in ex.prompt and "line 0\n" not in ex.prompt

    drop = CommitPackBenchmark(source="jsonl", data_dir=str(d), max_old_chars=100, max_new_chars=200, long_policy="drop").build("all")
    assert drop.info["dropped"] == {"identical": 1, "long_new": 1, "long_old": 1} and drop.info["truncated_old"] == 0
    assert all(e.meta["path"] != "a.py" for e in drop.train + drop.val)
    assert sum(drop.info["counts"].values()) == 7


def _commits(split) -> list[str]:
    return [e.meta["commit"] for e in split]


def test_train_max_chars_adds_long_rows_to_train_only(tmp_path):
    """Rows capped out of val/test join train under the larger cap; val, test and val's files are untouched."""
    long_old = "x = 0\n" * 30  # 180 bytes: over the 100 cap, within 200
    rows = [_edit(f"o/r{f}", f"m{f}.py", i) for f in range(10) for i in range(2)]  # short rows, 10 files
    rows += [_edit(f"o/r{f}", f"m{f}.py", 10 + f, old=long_old) for f in range(10)]  # one long row per file
    rows += [_edit("o/big", "big.py", 0, old="y = 1\n" * 60)]  # 360 bytes: over both caps
    d = tmp_path / "d"
    _write(d / "train.jsonl", rows)
    _write(d / "test.jsonl", [_edit("o/t", "t.py", 0, old=long_old), _edit("o/t", "t.py", 1)])
    caps = dict(source="jsonl", data_dir=str(d), max_old_chars=100, max_new_chars=100, long_policy="drop", val_fraction=0.2, seed=3)
    base = CommitPackBenchmark(**caps).build("all")
    more = CommitPackBenchmark(**caps, train_max_chars=200).build("all")
    assert _commits(more.val) == _commits(base.val) and _commits(more.test) == _commits(base.test) == ["o/t-t.py-1"]
    assert _commits(more.train)[: len(base.train)] == _commits(base.train)
    val_files = {e.group for e in base.val}
    added = more.train[len(base.train):]
    assert {e.group for e in added} == {e.group for e in base.train} and not val_files & {e.group for e in added}
    assert all(e.prompt == format_prompt(long_old, f"Change number {10 + int(e.meta['path'][1:-3])} of {e.meta['path']}") for e in added)
    assert more.info["train_extra"] == {"train_max_chars": 200, "added": 10 - len(val_files), "held_out_file_rows": len(val_files), "over_cap": 1}
    assert more.info["counts"]["train"] == len(base.train) + 10 - len(val_files)
    assert CommitPackBenchmark(**caps).cache_path("all") != CommitPackBenchmark(**caps, train_max_chars=200).cache_path("all")


def test_train_max_chars_holds_out_a_carved_test_splits_files(tmp_path):
    rows = [_edit(f"o/r{f}", f"m{f}.py", i) for f in range(10) for i in range(2)]
    rows += [_edit(f"o/r{f}", f"m{f}.py", 10 + f, old="x = 0\n" * 30) for f in range(10)]
    train = _write(tmp_path / "train.jsonl", rows)
    caps = dict(source="jsonl", train_file=str(train), max_old_chars=100, long_policy="drop", test_size=4, seed=1)
    base = CommitPackBenchmark(**caps).build("all")
    more = CommitPackBenchmark(**caps, train_max_chars=200).build("all")
    assert _commits(more.test) == _commits(base.test) and _commits(more.val) == _commits(base.val)
    held = {e.group for e in base.test + base.val}
    assert not held & {e.group for e in more.train} and more.info["train_extra"]["held_out_file_rows"] == len(held)


# -- bad data files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", ["test.jsonl", "does not exist"]),
        ("empty", ["train.jsonl", "is empty"]),
        ("not_json", ["train.jsonl", "line 2", "not JSON"]),
        ("missing_field", ["train.jsonl", "line 3", "subject"]),
        ("not_text", ["row 2", "new_contents", "int"]),
    ],
)
def test_bad_data_files_name_the_problem(tmp_path, case, expected):
    d = _fixture_dir(tmp_path)
    train = d / "train.jsonl"
    good = train.read_text().splitlines()
    if case == "missing":
        (d / "test.jsonl").unlink()
    elif case == "empty":
        train.write_text("\n")
    elif case == "not_json":
        train.write_text(good[0] + "\n{oops\n")
    elif case == "missing_field":
        row = json.loads(good[2])
        del row["subject"]
        train.write_text("\n".join(good[:2] + [json.dumps(row)]) + "\n")
    elif case == "not_text":
        row = json.loads(good[1])
        row["new_contents"] = 7
        train.write_text("\n".join([good[0], json.dumps(row)]) + "\n")
    with pytest.raises(KTMError) as err:
        CommitPackBenchmark(source="jsonl", data_dir=str(d)).build("all")
    for part in expected:
        assert part in str(err.value)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(KTMError, match="source"):
        CommitPackBenchmark(source="web")
    with pytest.raises(KTMError, match="long_policy"):
        CommitPackBenchmark(long_policy="cut")
    with pytest.raises(KTMError, match="max_old_chars"):
        CommitPackBenchmark(max_old_chars=0)
    with pytest.raises(KTMError, match="both set"):
        CommitPackBenchmark(data_dir="a", train_file="b")
    with pytest.raises(KTMError, match="test_size"):
        CommitPackBenchmark(test_size=1.5)
    with pytest.raises(KTMError, match="bad options"):
        get_benchmark("commitpack", bogus=1)
    with pytest.raises(KTMError, match="no data_dir or train_file"):
        CommitPackBenchmark(source="jsonl").build("all")
    with pytest.raises(KTMError, match="train_max_chars 0 must be a positive int"):
        CommitPackBenchmark(max_old_chars=10, train_max_chars=0)
    with pytest.raises(KTMError, match="no row is capped out"):
        CommitPackBenchmark(train_max_chars=2000)
    with pytest.raises(KTMError, match=r"must exceed max_old_chars / max_new_chars \(1200\)"):
        CommitPackBenchmark(max_old_chars=800, max_new_chars=1200, train_max_chars=1200)


# -- splitting and the cache -----------------------------------------------------------------------


def test_split_is_seeded_and_by_group(tmp_path):
    d = _fixture_dir(tmp_path, n_files=20)
    a = CommitPackBenchmark(source="jsonl", train_file=str(d / "train.jsonl"), seed=1).build("all")
    b = CommitPackBenchmark(source="jsonl", train_file=str(d / "train.jsonl"), seed=1).build("all")
    c = CommitPackBenchmark(source="jsonl", train_file=str(d / "train.jsonl"), seed=2).build("all")
    assert a.info["test_carved_from_train"] and a.info["counts"] == {"train": 51, "val": 3, "test": 6}  # val 5 asked, groups of 3, never over
    assert [e.meta["commit"] for e in a.test] == [e.meta["commit"] for e in b.test]
    assert {e.group for e in a.test} != {e.group for e in c.test}
    parts = [{e.group for e in s} for s in (a.train, a.val, a.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_edited_data_file_rebuilds_the_cache(tmp_path):
    d = _fixture_dir(tmp_path)
    first = CommitPackBenchmark(source="jsonl", data_dir=str(d))
    key1, path1 = first.cache_key("all"), first.cache_path("all")
    assert [f["path"] for f in key1["data_files"]] == [str((d / n).resolve()) for n in ("train.jsonl", "test.jsonl")]
    assert first.load("all").info["read"]["train"] == 24
    _write(d / "train.jsonl", _rows(d / "train.jsonl") + [_edit("o/new", "new.py", 0)])
    second = CommitPackBenchmark(source="jsonl", data_dir=str(d))
    assert second.cache_path("all") != path1 and second.cache_key("all")["data_files"][0]["sha256"] != key1["data_files"][0]["sha256"]
    assert second.load("all").info["read"]["train"] == 25


# -- hub source ------------------------------------------------------------------------------------


def _hub_row(repo: str, path: str, i: int) -> dict:
    return {
        "commit": f"{i:040x}",
        "old_file": path,
        "new_file": path,
        "old_contents": f"def f():\n    return {i}\n",
        "new_contents": f"def f():\n    return {i + 1}\n",
        "subject": f"Return {i + 1} from f",
        "message": f"Return {i + 1} from f\n\nLonger text.\n",
        "lang": "Python",
        "license": "mit",
        "repos": f"{repo},fork/{repo.split('/')[1]}",
    }


def _hub_fixture(tmp_path: Path, language: str = "python") -> Path:
    root = tmp_path / "hub"
    rows = [_hub_row(f"own{f % 3}/proj", f"pkg/m{f}.py", f * 10 + i) for f in range(12) for i in range(2)]
    rows.append({**_hub_row("own0/proj", "pkg/same.py", 999), "new_contents": "def f():\n    return 999\n"})
    _write(root / "data" / language / "data.jsonl", rows)
    return root


def test_hub_layout_fixture_through_datasets(tmp_path):
    root = _hub_fixture(tmp_path)
    bench = CommitPackBenchmark(source="hub", hub_root=str(root), hf_cache_dir=str(tmp_path / "hf"), test_size=4)
    splits = bench.load("all")
    info = splits.info
    assert info["source"] == "hub" and info["read"] == {"hub": 25}
    assert info["data_files"] == f"{root.resolve()}/data/python/data.jsonl"
    assert info["dropped"]["identical"] == 1
    assert info["counts"]["test"] == 4 and sum(info["counts"].values()) == 24
    parts = [{e.group for e in s} for s in (splits.train, splits.val, splits.test)]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    e = splits.test[0]
    i = int(e.meta["commit"], 16)
    assert e.group == f"own{(i // 10) % 3}/proj/pkg/m{i // 10}.py"  # first listed repo + file
    assert e.prompt == format_prompt(f"def f():\n    return {i}\n", f"Return {i + 1} from f")
    assert e.target == f"def f():\n    return {i + 1}\n"
    # The cache key names the local hub file by content.
    assert bench.cache_key("all")["hub"]["file"]["path"] == str((root / "data/python/data.jsonl").resolve())


def test_hub_errors(tmp_path):
    root = _hub_fixture(tmp_path)
    with pytest.raises(KTMError, match="has no data/go/data.jsonl"):
        CommitPackBenchmark(source="hub", hub_root=str(root), language="go").build("all")
    with pytest.raises(KTMError, match="unreachable"):
        CommitPackBenchmark(source="hub", hub_root=str(tmp_path / "nowhere")).build("all")
    with pytest.raises(KTMError, match="leaves no training data"):
        CommitPackBenchmark(source="hub", hub_root=str(root), hf_cache_dir=str(tmp_path / "hf"), test_size=24).build("all")


def test_remote_hub_path_is_read_with_the_json_builder(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    local = _hub_fixture(tmp_path) / "data" / "python" / "data.jsonl"
    seen = {}

    class Meta:
        etag, commit_hash = "etag123", "c0ffee"

    def fake_load(path, data_files=None, split=None, cache_dir=None, **kw):
        seen.update(path=path, data_files=data_files, split=split)
        return datasets.Dataset.from_list(_rows(local))

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", lambda url, timeout=None: Meta())
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits = CommitPackBenchmark(test_size=4).build("all")  # source auto: the hub "answers"
    assert seen == {"path": "json", "data_files": "hf://datasets/bigcode/commitpackft/data/python/data.jsonl", "split": "train"}
    assert splits.info["source"] == "hub" and splits.info["hub"]["etag"] == "etag123"
    bench = CommitPackBenchmark(source="hub", hub_revision="v1", language="go")
    assert bench.hub_data_files() == "hf://datasets/bigcode/commitpackft@v1/data/go/data.jsonl"


def test_auto_falls_back_to_jsonl_with_a_warning(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    d = _fixture_dir(tmp_path)

    def offline(url, timeout=None):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", offline)
    with caplog.at_level(logging.WARNING, logger="ktm"):
        splits = CommitPackBenchmark(data_dir=str(d)).load("all")
    assert splits.info["source"] == "jsonl" and splits.info["requested_source"] == "auto"
    assert "ConnectionError" in splits.info["fallback_reason"]
    assert any(r.levelno == logging.WARNING and "unreachable" in r.getMessage() for r in caplog.records)
    # The fallback's cache is keyed as jsonl, so it is never served as hub data.
    assert CommitPackBenchmark(data_dir=str(d)).cache_key("all")["source"] == "jsonl"
    # A missing local hub mirror falls back the same way.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ktm"):
        local = CommitPackBenchmark(data_dir=str(d), hub_root=str(tmp_path / "nowhere")).build("all")
    assert local.info["source"] == "jsonl" and any("unreachable" in r.getMessage() for r in caplog.records)
    with pytest.raises(KTMError, match="hub is unreachable"):
        CommitPackBenchmark().build("all")
    with pytest.raises(KTMError, match="unreachable"):
        CommitPackBenchmark(source="hub").build("all")


def test_size_caps_count_utf8_bytes_so_non_latin_text_cannot_slip_past(tmp_path):
    # 100 CJK characters = 300 UTF-8 bytes: a 200 cap drops it although it has only 100 characters
    # (byte-level tokenizers spend up to one token per byte on such text).
    wide = "".join("数" for _ in range(100)) + "\n"
    rows = [_edit("o/a", "a.py", 0, old="x = 1\n", new=wide), _edit("o/b", "b.py", 1, old=wide * 3, new="y = 2\n")]
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = CommitPackBenchmark(source="jsonl", data_dir=str(d), max_new_chars=200, max_old_chars=400).build("all").info
    assert info["dropped"]["long_new"] == 2 and info["truncated_old"] == 2
    cut = truncate_text(wide * 3, 400)
    assert cut == wide and len(cut.encode()) <= 400  # whole lines, never half a character
    assert truncate_text("ab数", 4) == "ab" and truncate_text("数ab", 4, side="left") == "ab"
