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
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ktm.errors import DiskFullError, KTMError

SIDECAR = ".sha256"


def text_size(text: str) -> int:
    """Size of a text for length caps: UTF-8 bytes. Equal to characters for ASCII, and an upper bound on the
    tokens of byte-level BPE (and SentencePiece byte fallback), so non-Latin text (3-4 tokens per character)
    cannot slip past a cap meant to bound a length in tokens."""
    return len(text.encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (safetensors, torch) re-raised it as its own error type."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text


def _disk_full_error(path: Path, exc: BaseException | None = None) -> KTMError:
    return DiskFullError(
        f"disk full while writing {path} (nothing was replaced; the previous version, if any, is intact)",
        "free some space (or write the runs elsewhere with --root) and run the command again",
    )


def _write_file(path: Path, data: bytes) -> None:
    """The one place ktm writes bytes to disk (tests simulate a full disk here)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: without this a power cut can forget it even after the file's fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform/filesystem; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    tmp_side: Path | None = None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; artefacts are meant to be shared
        if checksum:
            # The new sidecar is written in full *before* anything is renamed: a full disk can then only
            # fail while the previous file and its checksum are both still untouched.
            tmp_side = tmp_path.with_name(tmp_path.name + SIDECAR)
            _write_file(tmp_side, f"{sha256_file(tmp_path)}  {path.name}\n".encode())
        os.replace(tmp_path, path)
        if tmp_side is not None:
            os.replace(tmp_side, Path(str(path) + SIDECAR))
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if tmp_side is not None:
            tmp_side.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise _disk_full_error(path, exc) from None
        raise


OLD_DIR_MARK = ".old-"


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; on success swap it in for `path` as a whole.

    A folder of several files (an exported model) can then never mix files of two saves: a failure or
    full disk while writing leaves the previous folder untouched. POSIX has no atomic swap of two
    folders, so the previous one is first renamed to `.<name>.old-*`; if the process dies between
    the two renames, `path` is missing and `interrupted_save()` finds the complete previous copy.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD_DIR_MARK}", dir=path.parent))
            os.rmdir(old)  # only the unique name is wanted
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, DiskFullError) or (is_disk_full(exc) and not isinstance(exc, KTMError)):
            raise _disk_full_error(path, exc) from None  # name the folder the user asked for, not the temp one
        raise


def interrupted_save(path: str | os.PathLike) -> Path | None:
    """The previous copy of folder `path` left by an `atomic_dir` swap that was cut short, if any."""
    path = Path(path)
    olds = sorted(path.parent.glob(f".{path.name}{OLD_DIR_MARK}*"), key=lambda p: p.stat().st_mtime)
    return olds[-1] if olds else None


def write_bytes(path: str | os.PathLike, data: bytes, checksum: bool = True) -> Path:
    with atomic_path(path, checksum) as tmp:
        _write_file(tmp, data)
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


# -- training checkpoints (torch pickles) ------------------------------------------------------------


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save through the atomic writer: serialised in memory first, so the bytes reach the disk
    through one write call (a full disk is reported as such, the previous file is kept)."""
    import io as _io

    import torch

    buf = _io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def load_torch(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu", weights_only: bool | None = None) -> Any:
    """torch.load with one-line errors: missing, checksum mismatch (when a sidecar exists: files from
    other tools may lack one), truncated or not a torch file."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        folder = path.parent
        present = sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []
        hint = f"checkpoints in {folder}: {', '.join(present)}" if present else "check the path"
        raise KTMError(f"{what} {path} does not exist", f"{hint} (or drop --ckpt_path to start a new run)")
    verify(path, what, required=False)
    kwargs = {} if weights_only is None else {"weights_only": weights_only}
    try:
        return torch.load(path, map_location=map_location, **kwargs)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:140]
        if "Weights only load failed" in str(exc):
            raise KTMError(f"{what} {path} holds Python objects that are not loaded safely ({first})",
                           "resume only from checkpoints written by ktm (checkpoints/<exp>/<run>/checkpoints/*.ckpt)") from None
        raise KTMError(f"{what} {path} is truncated or corrupt ({first})",
                       "resume from another checkpoint of the run (e.g. last.ckpt) or start a new run") from None
