"""The commit miner behind `ktm data commits`: single-file edit commits of a local git repository become
CommitPackFT-style JSON Lines rows, which the commitpack benchmark reads as its jsonl source.

It is a data tool, not a benchmark, so it lives apart from ktm/benchmarks/commitpack.py: it runs git and
writes files, while the benchmark only reads rows. The rule is the one used for the shared set (see
shared/data/commits/SOURCES.md); `mine_commits` applies it, `main` is its command line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ktm.benchmarks import common
from ktm.errors import KTMError, OneLineParser
from ktm.io import write_jsonl

# File extensions per language (CommitPackFT's language names where they exist).
LANGUAGE_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "python": (".py",),
    "javascript": (".js", ".mjs", ".cjs"),
    "typescript": (".ts",),
    "go": (".go",),
    "rust": (".rs",),
    "java": (".java",),
    "c": (".c", ".h"),
    "c++": (".cc", ".cpp", ".cxx", ".hpp", ".hh"),
    "ruby": (".rb",),
    "shell": (".sh",),
}


_RECORD, _FIELD = "\x1e", "\x1f"  # separators that do not occur in shas or one-line subjects


def _git(args: list[str], cwd: Path, input_bytes: bytes | None = None) -> bytes:
    proc = subprocess.run(["git", *args], cwd=cwd, input=input_bytes, capture_output=True)
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"]
        raise KTMError(f"git {args[0]} failed in {cwd}: {msg[-1]}", "check that the repository is intact (git fsck)")
    return proc.stdout


def _repo_name(top: Path) -> str:
    """owner/name from the origin remote when it is a GitHub-like URL, else the folder name."""
    proc = subprocess.run(["git", "remote", "get-url", "origin"], cwd=top, capture_output=True, text=True)
    m = re.search(r"[:/]([^/:]+/[^/]+?)(?:\.git)?/?$", proc.stdout.strip()) if proc.returncode == 0 else None
    return m.group(1) if m else top.name


_TOO_BIG = object()  # marks a blob skipped by size, so huge files are never read into memory


def _read_blobs(top: Path, specs: list[str], max_bytes: int) -> list[Any]:
    """Contents of `rev:path` specs via `git cat-file`: bytes, None (missing or not a file) or _TOO_BIG.

    Sizes are checked first (--batch-check) and only blobs of at most `max_bytes` are read (--batch).
    """
    if not specs:
        return []

    def usable(header: list[bytes]) -> bool:
        # "<oid> blob <size>"; a missing spec reads "<spec> missing" (the spec may contain spaces).
        return header[-1] != b"missing" and len(header) == 3 and header[1] == b"blob"

    checks = _git(["cat-file", "--batch-check"], top, "".join(s + "\n" for s in specs).encode("utf-8"))
    out: list[Any] = []
    wanted: list[int] = []
    # One line per spec (paths with newlines were dropped earlier as git-quoted).
    for i, line in enumerate(checks.split(b"\n")[: len(specs)]):
        header = line.split(b" ")
        if not usable(header):
            out.append(None)
        elif int(header[2]) > max_bytes:
            out.append(_TOO_BIG)
        else:
            out.append(b"")
            wanted.append(i)
    if wanted:
        data = _git(["cat-file", "--batch"], top, "".join(specs[i] + "\n" for i in wanted).encode("utf-8"))
        pos = 0
        for i in wanted:
            end = data.index(b"\n", pos)
            size = int(data[pos:end].split(b" ")[2])
            out[i] = data[end + 1 : end + 1 + size]
            pos = end + 1 + size + 1  # the content is followed by a newline
    return out


def mine_commits(
    repo: str | Path,
    out: str | Path,
    language: str = "python",
    max_changed_lines: int = 60,
    max_chars: int = 6000,
    max_commits: int | None = 4000,
    *,
    repo_name: str | None = None,
    license: str | None = None,
) -> dict[str, Any]:
    """Write single-file edit commits of a local git repository as CommitPackFT-style JSON Lines.

    Walks the newest `max_commits` non-merge commits (`git log --no-merges`, None = all) and keeps a
    commit when: its subject is >= 10 characters and does not start with "Merge"; it changes exactly one
    file (no rename detection) with the language's extension, not binary, added + deleted lines <=
    max_changed_lines; the file exists in the first parent and in the commit, both versions are UTF-8
    and <= max_chars characters, and they differ; the (old, new) pair was not kept already (cherry-picks;
    the newest copy is kept). Rows: {repo, commit, path, subject, old_contents, new_contents[, license]},
    written atomically. `repo_name` defaults to owner/name of the origin remote (else the folder name).

    Returns {"repo", "out", "scanned", "kept", "dropped": {reason: count}}.
    """
    if language not in LANGUAGE_EXTENSIONS:
        raise KTMError(f"mine_commits: unknown language {language!r}", f"use one of: {', '.join(sorted(LANGUAGE_EXTENSIONS))}")
    if shutil.which("git") is None:
        raise KTMError("git is not installed (or not on PATH)", "install git to mine commits")
    repo = Path(repo)
    if not repo.is_dir():
        raise KTMError(f"{repo} is not a folder", "pass the path of a local git clone with --repo")
    probe = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=repo, capture_output=True, text=True)
    if probe.returncode != 0:
        raise KTMError(f"{repo} is not a git repository", "pass the path of a local git clone with --repo")
    top = Path(probe.stdout.strip())
    if subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=top, capture_output=True).returncode != 0:
        raise KTMError(f"{top} has no commits", "pass a repository with history")
    extensions = LANGUAGE_EXTENSIONS[language]
    name = repo_name or _repo_name(top)

    args = ["-c", "core.quotepath=off", "log", "--no-merges", "--no-renames", "--no-ext-diff", "--no-textconv", "--numstat"]
    args += [f"--format={_RECORD}%H{_FIELD}%P{_FIELD}%s"]
    if max_commits is not None:
        args.append(f"--max-count={max_commits}")
    log_text = _git(args + ["HEAD", "--"], top).decode("utf-8", "replace")

    dropped: dict[str, int] = {}
    candidates: list[tuple[str, str, str, str]] = []  # (sha, parent, path, subject)

    def drop(reason: str) -> None:
        dropped[reason] = dropped.get(reason, 0) + 1

    records = [r for r in log_text.split(_RECORD) if r.strip()]
    for record in records:
        header, _, rest = record.partition("\n")
        sha, parents, subject = header.split(_FIELD, 2)
        files = [line.split("\t", 2) for line in rest.splitlines() if line.strip()]
        if len(subject.strip()) < 10:
            drop("short_subject")
        elif subject.startswith("Merge"):
            drop("merge_subject")
        elif not parents.strip():
            drop("root_commit")
        elif len(files) != 1:
            drop("not_single_file")
        elif files[0][2].startswith('"'):
            drop("unusual_path")  # git quoted it: control characters or quotes in the name
        elif not files[0][2].endswith(extensions):
            drop("other_language")
        elif files[0][0] == "-":
            drop("binary")
        elif int(files[0][0]) + int(files[0][1]) > max_changed_lines:
            drop("too_many_changed_lines")
        else:
            candidates.append((sha, parents.split()[0], files[0][2], subject.strip()))

    # A UTF-8 character is at most 4 bytes, so a blob over 4 * max_chars bytes is too long anyway.
    specs = [s for sha, parent, path, _ in candidates for s in (f"{parent}:{path}", f"{sha}:{path}")]
    blobs = _read_blobs(top, specs, 4 * max_chars)
    rows: list[dict] = []
    seen: set[tuple[str, str]] = set()
    for i, (sha, _parent, path, subject) in enumerate(candidates):
        old_b, new_b = blobs[2 * i], blobs[2 * i + 1]
        if old_b is None:
            drop("not_in_parent")
            continue
        if new_b is None:
            drop("not_in_commit")
            continue
        if old_b is _TOO_BIG or new_b is _TOO_BIG:
            drop("too_long")
            continue
        try:
            old, new = old_b.decode("utf-8"), new_b.decode("utf-8")
        except UnicodeDecodeError:
            drop("not_utf8")
            continue
        if len(old) > max_chars or len(new) > max_chars:
            drop("too_long")
        elif old == new:
            drop("unchanged")  # e.g. a mode-only change
        elif (old, new) in seen:
            drop("duplicate")
        else:
            seen.add((old, new))
            row = {"repo": name, "commit": sha, "path": path, "subject": subject, "old_contents": old, "new_contents": new}
            if license is not None:
                row["license"] = license
            rows.append(row)

    stats = {"repo": name, "out": str(out), "scanned": len(records), "kept": len(rows), "dropped": dict(sorted(dropped.items()))}
    if not rows:
        raise KTMError(f"no commit of {top} passed the filters (scanned {len(records)}, dropped {stats['dropped']})", "try another --language or larger --max-changed-lines/--max-chars")
    write_jsonl(out, rows)
    return stats


def main(argv: list[str] | None = None) -> int:
    """`ktm data commits --repo PATH [--language python] [--out FILE] ...`: mine commits, print a summary."""
    p = OneLineParser(prog="ktm data commits", description="Mine single-file edit commits of a local git repository into CommitPackFT-style JSON Lines.")
    p.add_argument("--repo", required=True, help="path of a local git clone")
    p.add_argument("--language", default="python", choices=sorted(LANGUAGE_EXTENSIONS))
    p.add_argument("--out", default=None, help="output .jsonl (default: $KTM_DATA/commits/<folder>-<language>.jsonl)")
    p.add_argument("--max-changed-lines", type=int, default=60, help="added + deleted lines (default 60)")
    p.add_argument("--max-chars", type=int, default=6000, help="max characters of each file version (default 6000)")
    p.add_argument("--max-commits", type=int, default=4000, help="newest non-merge commits to walk, 0 = all (default 4000)")
    p.add_argument("--repo-name", default=None, help="repo field of the rows (default: owner/name of origin, else the folder name)")
    p.add_argument("--license", default=None, help="SPDX id written into every row (default: none)")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else common.DATA_DIR / "commits" / f"{Path(a.repo).resolve().name}-{a.language}.jsonl"
    stats = mine_commits(
        a.repo, out, a.language, a.max_changed_lines, a.max_chars, a.max_commits or None, repo_name=a.repo_name, license=a.license
    )
    drops = ", ".join(f"{k} {v}" for k, v in stats["dropped"].items()) or "none"
    print(f"mined {stats['kept']} of {stats['scanned']} commits of {stats['repo']} -> {out} (dropped: {drops})")
    return 0
