"""Artefact I/O: every file ktm writes is written to a temp file and renamed atomically, with its
sha256 recorded in a `<file>.sha256` sidecar; readers verify before they load.

A crash, Ctrl-C or full disk therefore never leaves a half-written file under the final name, and a
truncated or edited file is refused with a clear message instead of a confusing load error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ktm.errors import KTMError

SIDECAR = ".sha256"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _disk_full_error(path: Path, exc: OSError) -> KTMError:
    return KTMError(
        f"disk full while writing {path} (nothing was replaced; the previous version, if any, is intact)",
        "free some space (or point KTM_CACHE / --trainer.default_root_dir elsewhere) and run the command again",
    )


@contextmanager
def atomic_path(path: str | os.PathLike, checksum: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync + rename it into place (+ sha256 sidecar).

    On any error the temp file is removed and `path` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp_path) if checksum else None
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; artefacts are meant to be shared
        os.replace(tmp_path, path)
        if digest is not None:
            write_text(Path(str(path) + SIDECAR), f"{digest}  {path.name}\n", checksum=False)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise _disk_full_error(path, exc) from None
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes, checksum: bool = True) -> Path:
    with atomic_path(path, checksum) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, checksum: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), checksum)


def write_json(path: str | os.PathLike, obj: Any, checksum: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", checksum)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None], checksum: bool = True) -> Path:
    """Atomic write through a library writer that takes a path (safetensors, torch.save, ...)."""
    with atomic_path(path, checksum) as tmp:
        writer(tmp)
    return Path(path)


def recorded_sha256(path: str | os.PathLike) -> str | None:
    side = Path(str(path) + SIDECAR)
    if not side.exists():
        return None
    return side.read_text().split()[0] if side.read_text().strip() else None


def verify(path: str | os.PathLike, what: str = "file", required: bool = True) -> Path:
    """Check `path` exists and matches its recorded sha256; raise a one-line KTMError if not."""
    path = Path(path)
    if not path.exists():
        raise KTMError(f"{what} {path} is missing", "re-run the command that produces it (or pick another directory)")
    expected = recorded_sha256(path)
    if expected is None:
        if required:
            raise KTMError(
                f"{what} {path} has no recorded checksum ({path.name}{SIDECAR} is missing), so it may be partial",
                "re-create it with ktm (files written by ktm always carry a checksum)",
            )
        return path
    actual = sha256_file(path)
    if actual != expected:
        raise KTMError(
            f"{what} {path} is truncated or corrupt (sha256 {actual[:12]}... != recorded {expected[:12]}...)",
            "delete it and re-run the command that produces it",
        )
    return path


def read_json(path: str | os.PathLike, what: str = "file", required: bool = True) -> Any:
    verify(path, what, required)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KTMError(f"{what} {path} is not valid JSON ({exc})", "delete it and re-create it") from None


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike, required_fields: tuple[str, ...] = (), what: str = "data file") -> list[dict]:
    """Read a JSON Lines file written by anyone (no checksum needed); name the line of any bad row."""
    path = Path(path)
    if not path.exists():
        raise KTMError(f"{what} {path} does not exist", "check the path in your config (data.*) or create the file")
    rows: list[dict] = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise KTMError(
                        f"{what} {path} line {lineno} is not JSON ({exc.msg})",
                        "the file must be JSON Lines: one JSON object per line",
                    ) from None
                if not isinstance(row, dict):
                    raise KTMError(f"{what} {path} line {lineno} is not a JSON object", "write one {...} object per line")
                missing = [k for k in required_fields if k not in row]
                if missing:
                    raise KTMError(
                        f"{what} {path} line {lineno} lacks required field(s) {', '.join(missing)}",
                        f"every row needs: {', '.join(required_fields)}",
                    )
                rows.append(row)
        except UnicodeDecodeError:
            raise KTMError(f"{what} {path} is not UTF-8 text", "the file must be JSON Lines in UTF-8") from None
    if not rows:
        raise KTMError(f"{what} {path} is empty", "fill it with JSON Lines rows or point the config at another file")
    return rows
