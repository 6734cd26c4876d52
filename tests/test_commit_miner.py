"""The commit miner (ktm/benchmarks/commit_miner.py, `ktm data commits`) on throwaway git repositories."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ktm.benchmarks import common
from ktm.benchmarks.commit_miner import main, mine_commits
from ktm.benchmarks.commitpack import CommitPackBenchmark, format_prompt
from ktm.errors import KTMError


@pytest.fixture(autouse=True)
def _data_dir(tmp_path, monkeypatch):
    # Caches and default outputs go to a temp folder, never to the repository's data/.
    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "cache")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class _Repo:
    """A throwaway git repository with deterministic commit dates."""

    def __init__(self, path: Path):
        self.path, self.t = path, 1_700_000_000
        path.mkdir()
        self.git("init", "-q", "-b", "main")

    def git(self, *args: str) -> str:
        self.t += 60
        env = {
            **os.environ,
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "T",
            "GIT_AUTHOR_EMAIL": "t@example.com",
            "GIT_COMMITTER_NAME": "T",
            "GIT_COMMITTER_EMAIL": "t@example.com",
            "GIT_AUTHOR_DATE": f"{self.t} +0000",
            "GIT_COMMITTER_DATE": f"{self.t} +0000",
        }
        return subprocess.run(["git", *args], cwd=self.path, env=env, check=True, capture_output=True, text=True).stdout

    def commit(self, subject: str, **files: str) -> str:
        for name, text in files.items():
            (self.path / name.replace("__", ".")).write_text(text)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", subject)
        return self.git("rev-parse", "HEAD").strip()


@pytest.fixture
def mined_repo(tmp_path) -> tuple[_Repo, dict[str, str]]:
    r = _Repo(tmp_path / "proj")
    shas = {}
    r.commit("Initial commit of the project", a__py="a = 1\n", b__py="b = 1\n", c__py="c = 1\n", README__md="hi\n")
    shas["a"] = r.commit("Fix the value of a", a__py="a = 2\n")
    r.commit("Touch two files at once", a__py="a = 3\n", b__py="b = 2\n")
    r.commit("Document the usage better", README__md="hello\n")
    r.commit("fix", b__py="b = 3\n")
    r.commit("Merge helper code into c", c__py="c = 2\n")
    r.git("checkout", "-q", "-b", "feature")
    shas["b"] = r.commit("Rename the variable in b", b__py="bb = 3\n")
    r.git("checkout", "-q", "main")
    shas["c"] = r.commit("Add a docstring to module c", c__py='"""C."""\nc = 2\n')
    r.git("merge", "-q", "--no-ff", "-m", "Merge branch 'feature' into main", "feature")
    r.commit("Add many generated functions", a__py="a = 3\n" + "".join(f"def f{i}(): pass\n" for i in range(80)))
    r.commit("Add module d with helpers", d__py="d = 1\n")
    r.git("remote", "add", "origin", "git@github.com:owner/proj.git")
    return r, shas


def test_miner_keeps_only_single_file_language_edits(mined_repo, tmp_path):
    repo, shas = mined_repo
    out = tmp_path / "mined.jsonl"
    stats = mine_commits(repo.path, out, license="MIT")
    assert stats["scanned"] == 10 and stats["kept"] == 3  # the merge commit itself is never walked
    assert stats["dropped"] == {
        "merge_subject": 1,
        "not_in_parent": 1,
        "not_single_file": 1,
        "other_language": 1,
        "root_commit": 1,
        "short_subject": 1,
        "too_many_changed_lines": 1,
    }
    rows = _rows(out)
    assert (tmp_path / "mined.jsonl.sha256").exists()  # written through ktm.io (atomic + checksum)
    assert {r["commit"] for r in rows} == set(shas.values())
    a = next(r for r in rows if r["commit"] == shas["a"])
    assert a == {
        "repo": "owner/proj",
        "commit": shas["a"],
        "path": "a.py",
        "subject": "Fix the value of a",
        "old_contents": "a = 1\n",
        "new_contents": "a = 2\n",
        "license": "MIT",
    }
    assert mine_commits(repo.path, tmp_path / "few.jsonl", max_commits=3)["scanned"] == 3
    # Filters that keep nothing give a clear error and no empty file.
    with pytest.raises(KTMError, match="no commit"):
        mine_commits(repo.path, tmp_path / "none.jsonl", max_chars=3)
    assert not (tmp_path / "none.jsonl").exists()


def test_mined_rows_load_as_the_jsonl_source(mined_repo, tmp_path):
    repo, shas = mined_repo
    out = tmp_path / "mined.jsonl"
    mine_commits(repo.path, out)
    splits = CommitPackBenchmark(source="jsonl", train_file=str(out)).build("all")
    assert splits.info["counts"] == {"train": 1, "val": 1, "test": 1}  # three files, one each
    examples = {e.meta["commit"]: e for e in splits.train + splits.val + splits.test}
    assert set(examples) == set(shas.values())
    e = examples[shas["c"]]
    assert e.group == "owner/proj/c.py" and e.target == '"""C."""\nc = 2\n'
    assert e.prompt == format_prompt("c = 2\n", "Add a docstring to module c")


def test_miner_errors(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(KTMError, match="not a git repository"):
        mine_commits(plain, tmp_path / "o.jsonl")
    with pytest.raises(KTMError, match="unknown language"):
        mine_commits(plain, tmp_path / "o.jsonl", language="cobol")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(KTMError, match="git is not installed"):
        mine_commits(plain, tmp_path / "o.jsonl")


def test_miner_cli_prints_one_line(mined_repo, tmp_path, capsys):
    repo, _ = mined_repo
    out = tmp_path / "cli.jsonl"
    assert main(["--repo", str(repo.path), "--out", str(out), "--max-commits", "0", "--repo-name", "me/p"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("mined 3 of 10 commits of me/p -> ")
    assert {r["repo"] for r in _rows(out)} == {"me/p"}
    # Without --out the file goes under the (temporary) data folder.
    main(["--repo", str(repo.path)])
    assert (common.DATA_DIR / "commits" / "proj-python.jsonl").exists()
