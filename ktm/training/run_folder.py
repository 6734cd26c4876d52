"""Run folders: `<root>/<experiment>/<run>/` belongs to one run, and a run is never mixed with another or lost.

The rules, all here (the CLI calls them; tests/test_run_folder.py checks each):

- **names**: `--run` and `--experiment` are plain folder names (no `/`, `..`, absolute path, empty), so a
  run can only land inside `--root`.
- **one run per folder**: `ktm fit` into a folder that already holds a run (config.yaml, checkpoints/,
  metrics.json or export/) is refused, unless it resumes that run (`--ckpt_path` inside the folder), or
  `--overwrite` is given: the old folder is then *moved aside* to `<run>.old-<time>`, never deleted, and
  only once the new run has passed every check and starts training (`RunFolder.begin`).
- **one process per folder**: a lock file `ktm.lock` holding the owner's pid, host and command. The lock
  itself is an flock(2) on that file, which the kernel drops when the owner dies, so a lock left by a
  killed run is taken over (with a warning) and a live one is refused. Without flock (some network
  filesystems) the recorded pid decides: alive on this host = busy, dead = stale.
- **nothing half-made**: a folder this command created is removed again if the command ends before the
  run wrote anything (a failed check, Ctrl-C while the base loads).
- `ktm test`/`validate` without `--ckpt_path` on a trained run evaluate its model (and say so): `best.ckpt`
  where `checkpoint.monitor` selected one (checkpointing.py), else `last.ckpt`; or refuse: untrained-model
  numbers never go into a trained run's metrics.json (`eval_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from ktm.errors import KTMError

try:  # POSIX; elsewhere the recorded pid alone decides
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("ktm")

RUN_FILES = ("config.yaml", "checkpoints", "metrics.json", "export")  # any of these = the folder holds a run
LOCK_NAME = "ktm.lock"
ASIDE_MARK = ".old-"
# `--ckpt_path` values Lightning resolves inside the run's own checkpoint folder.
SPECIAL_CKPT = ("last", "best", "hpc", "registry")
_MAX_NAME_BYTES = 200


# -- names ---------------------------------------------------------------------------------------------


def check_name(name: object, option: str) -> str:
    """`name` if it is a plain folder name, else a KTMError naming `option` (e.g. `--run`)."""
    text = "" if name is None else str(name)
    if not text.strip():
        why = "is empty"
    elif text in (".", ".."):
        why = "is not a folder name"
    elif "/" in text or "\\" in text or (os.sep in text) or (os.altsep and os.altsep in text):
        why = "contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        why = "contains a control character"
    elif text != text.strip():
        why = "starts or ends with a space"
    elif len(text.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        why = f"is longer than {_MAX_NAME_BYTES} bytes"
    else:
        return text
    plain = re.sub(r"[^\w.+=@,-]+", "_", text.strip()).strip("._")[:60] or "run1"
    raise KTMError(f"{option} {text!r} {why}: run and experiment names are plain folder names inside --root",
                   f"use a name like {option} {plain} (to write the runs elsewhere, set --root)")


def run_path(root: str | os.PathLike, experiment: str, run: str) -> Path:
    return Path(root) / check_name(experiment, "--experiment") / check_name(run, "--run")


def run_contents(folder: Path) -> list[str]:
    """Which of the files that make a run (RUN_FILES) `folder` holds."""
    return [name for name in RUN_FILES if (folder / name).exists()]


def _inside(path: str | os.PathLike, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def aside_path(folder: Path) -> Path:
    """`<run>.old-<YYYYmmdd-HHMMSS>` beside `folder` (a `-2`, `-3`, ... suffix when taken)."""
    base = f"{folder.name}{ASIDE_MARK}{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = folder.with_name(base), 2
    while candidate.exists():
        candidate, n = folder.with_name(f"{base}-{n}"), n + 1
    return candidate


def _checkpoint_files(folder: Path) -> list[Path]:
    ckpts = folder / "checkpoints"
    return sorted(ckpts.glob("*.ckpt")) if ckpts.is_dir() else []


def _resume_hint(folder: Path) -> str:
    """`resume it: ktm fit --config .. --ckpt_path ..; ` for the run in `folder` (empty without a checkpoint)."""
    last = folder / "checkpoints" / "last.ckpt"
    files = _checkpoint_files(folder)
    if last.is_file():
        pick = last
    elif files:
        pick = max(files, key=lambda p: p.stat().st_mtime)
    else:
        return ""
    config = folder / "config.yaml"
    how = f"ktm fit --config {config} --ckpt_path {pick}" if config.is_file() else f"add --ckpt_path {pick}"
    return f"resume it: {how}; or "


def _trained(folder: Path) -> bool:
    """Whether `folder` holds a trained model's outputs (an export, or metrics written by `ktm fit`)."""
    if (folder / "export").exists():
        return True
    metrics = folder / "metrics.json"
    if not metrics.is_file():
        return False
    try:
        return "global_step" in json.loads(metrics.read_text())
    except (OSError, ValueError):
        return True  # unreadable: assume the worst


def eval_checkpoint(folder: Path, command: str) -> Path | None:
    """The checkpoint `ktm test`/`validate` without `--ckpt_path` evaluates in run folder `folder`: the
    run's model, i.e. best.ckpt where the fit selected one by validation (its export holds the same weights),
    else last.ckpt; None for a folder without a trained run (the untrained model is then what is
    evaluated), and a KTMError where neither fits."""
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / "checkpoints" / name).is_file():
            return folder / "checkpoints" / name
    files = _checkpoint_files(folder)
    if files:
        names = ", ".join(p.name for p in files[:6])
        raise KTMError(f"run folder {folder} has checkpoints but no last.ckpt, and `{command}` was given no --ckpt_path",
                       f"pass --ckpt_path {folder / 'checkpoints'}/<one of: {names}>")
    if _trained(folder):
        raise KTMError(f"run folder {folder} holds a trained run but no checkpoint to evaluate, and `{command}` was given "
                       "no --ckpt_path (it would write the untrained model's numbers into that run's metrics.json)",
                       "pass --ckpt_path <a .ckpt of the run>, or evaluate the untrained model into another --run")
    return None


# -- the lock ------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _describe(owner: dict) -> str:
    bits = [f"pid {owner.get('pid', '?')}"]
    if owner.get("host"):
        bits.append(f"on {owner['host']}")
    if owner.get("started"):
        bits.append(f"since {owner['started']}")
    return " ".join(bits)


def _parse_owner(text: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    m = re.fullmatch(r"\s*(\d+)\s*", text)  # a hand-written or foreign lock: a bare pid
    return {"pid": int(m.group(1))} if m else {}


class RunLock:
    """`<folder>/ktm.lock`: held by one process at a time (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict:
        try:
            return _parse_owner(self.path.read_text(errors="replace"))
        except OSError:
            return {}

    def _busy(self, owner: dict, command: str) -> KTMError:
        who = owner.get("command") or "ktm"
        fix = "wait for it to finish, or pick another --run (or --root)"
        if owner.get("host") and owner["host"] != socket.gethostname():
            fix += f"; if that run is gone, delete {self.path}"
        return KTMError(f"run folder {self.folder} is in use by another `{who}` ({_describe(owner)}), so `{command}` "
                        "would mix its files with that run's", fix)

    def acquire(self, command: str) -> None:
        """Take the lock or raise a KTMError naming its owner. A stale lock is taken over with a warning."""
        if self.held:
            return
        if self.folder.exists() and not self.folder.is_dir():
            raise KTMError(f"run folder {self.folder} exists but is a file", "pick another --run, or move that file away")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KTMError(f"cannot create the run folder {self.folder} ({exc.strerror or exc})",
                           "set --root to a folder you can write to") from None
        previous = self._acquire_flock(command) if fcntl is not None else None
        if self._fd is None:  # no flock here: fall back to the recorded pid
            previous = self._acquire_by_pid(command)
        try:
            self._write_owner(command)
        except OSError as exc:  # a full disk, typically
            self.release()
            raise KTMError(f"cannot write the lock file {self.path} ({exc.strerror or exc})",
                           "free some space (or write the runs elsewhere with --root) and run the command again") from None
        if previous and previous.get("pid") not in (None, os.getpid()):
            log.warning("took over the stale lock %s of %s: that `%s` is no longer running", self.path,
                        _describe(previous), previous.get("command") or "ktm")

    def _acquire_flock(self, command: str) -> dict | None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise KTMError(f"cannot create the lock file {self.path} ({exc.strerror or exc})",
                               "set --root to a folder you can write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy(self.owner(), command) from None
                return None  # ENOLCK, EOPNOTSUPP...: this filesystem has no flock
            try:  # the holder may have removed the file between our open and our flock: retry on the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return _parse_owner(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)

    def _acquire_by_pid(self, command: str) -> dict | None:
        previous = None
        for _ in range(3):
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                return previous
            except FileExistsError:
                owner = self.owner()
                same_host = owner.get("host") in (None, socket.gethostname())
                pid = owner.get("pid")
                if not same_host or (isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)):
                    raise self._busy(owner, command) from None
                previous = owner
                self.path.unlink(missing_ok=True)
            except OSError as exc:
                raise KTMError(f"cannot create the lock file {self.path} ({exc.strerror or exc})",
                               "set --root to a folder you can write to") from None
        raise self._busy(self.owner(), command)

    def _write_owner(self, command: str) -> None:
        doc = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        data = (json.dumps(doc) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # unlink while still holding it: a process waiting on the old file retries on a fresh one
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


# -- reuse of a finished run ----------------------------------------------------------------------------

# Settings that say where a run writes, how it shows progress or which command made it, not what it trains:
# two configs that differ only in these make the same run.
NOT_THE_RUN = ("root", "experiment", "extends", "run", "overwrite", "reuse", "ckpt_path", "trainer.logger", "trainer.default_root_dir",
               "trainer.enable_progress_bar", "trainer.callbacks")
_ABSENT = object()


def config_difference(saved: dict, new: dict, defaults: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted name, saved value, new value) of the first setting on which two resolved configs differ, None when
    they make the same run. A setting the saved config lacks (it predates it) counts as its default."""
    for key in sorted(set(saved) | set(new), key=str):
        name = f"{prefix}{key}"
        if name in NOT_THE_RUN:
            continue
        default = defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT
        theirs, ours = saved.get(key, default), new.get(key, _ABSENT)
        if isinstance(theirs, dict) and isinstance(ours, dict):
            found = config_difference(theirs, ours, default if isinstance(default, dict) else {}, f"{name}.")
            if found:
                return found
        elif theirs != ours:
            return name, theirs, ours
    return None


def _cap_seconds(cap) -> float | None:
    """trainer.max_time as config.yaml holds it ("DD:HH:MM:SS", or None: no cap) in seconds; None for another form."""
    if cap is None:
        return float("inf")
    try:
        days, hours, minutes, seconds = (int(part) for part in str(cap).split(":"))
    except ValueError:
        return None
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def _metrics(folder: Path) -> dict:
    """The run's metrics.json, or {} where it is missing or unreadable (the callers then say or accept nothing)."""
    try:
        return json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _cap_did_not_bind(folder: Path, saved: dict, new: dict) -> bool:
    """A finished run that its wall-clock cap did not stop comes out the same under a cap at least as long (or none).
    metrics.json's stop.by says what stopped it (runs since 2026-12-08: its step or epoch budget, or the val rule);
    before, a run whose global_step reached its trainer.max_steps stopped there."""
    saved_trainer, new_trainer = saved.get("trainer") or {}, new.get("trainer") or {}
    old_cap, new_cap = _cap_seconds(saved_trainer.get("max_time")), _cap_seconds(new_trainer.get("max_time"))
    if old_cap is None or new_cap is None or new_cap < old_cap:
        return False
    metrics = _metrics(folder)
    if metrics.get("stop"):
        return metrics["stop"].get("by") in ("max_steps", "max_epochs", "val_rule")
    steps = saved_trainer.get("max_steps")
    return isinstance(steps, int) and 0 < steps == new_trainer.get("max_steps") == metrics.get("global_step")


def say_if_made_elsewhere(folder: Path) -> None:
    """A warning where the reused run trained on another machine kind than this one (report.machine_of: the CPU,
    its native bf16, the GPUs): it is the same config, not the same model this machine would make."""
    from ktm.environment import environment
    from ktm.report import machine_of

    fit = (_metrics(folder).get("environment") or {}).get("fit") or {}
    here = {key: value for key, value in environment().items() if key in fit}  # what that run recorded, no more
    there, here = machine_of({"environment": {"fit": fit}}), machine_of({"environment": {"fit": here}})
    if there and here and there != here:
        log.warning("--reuse: %s was trained on %s, this machine is %s: runs that start from it hold that machine's "
                    "differences (README \"Machines differ\"); --overwrite makes it here", folder, there, here)


def reusable(folder: Path, new: dict, defaults: dict) -> bool:
    """`ktm fit --reuse`: True when `folder` holds a finished run (its export) made with the config `new` (parsed
    config.yaml dicts), False when it holds no finished run (the usual rules then apply: a half-finished one is
    refused with its resume command); one line when it holds a finished run of another config. A longer
    trainer.max_time is the same run where the saved run's cap did not stop it (_cap_did_not_bind)."""
    if not (folder / "export" / "ktm.json").is_file() or not (folder / "config.yaml").is_file():
        return False
    import yaml

    try:
        saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KTMError(f"cannot read {folder / 'config.yaml'} to compare it ({' '.join(str(exc).split())[:120]})",
                       "add --overwrite to make the run again (the old one is moved aside), or pick another --run") from None
    if _cap_did_not_bind(folder, saved, new):
        new = {**new, "trainer": {**new["trainer"], "max_time": saved["trainer"].get("max_time")}}
    found = config_difference(saved, new, defaults)
    if found:
        name, theirs, ours = found
        shown = ("(absent)" if v is _ABSENT else " ".join(str(v).split())[:60] for v in (theirs, ours))
        cut = name == "trainer.max_time" and (_metrics(folder).get("stop") or {}).get("by") == "max_time"
        why = " (its cap stopped that run short of its budget)" if cut else ""
        raise KTMError(f"run folder {folder} holds a finished run of another config: {name} is {next(shown)} there, {next(shown)} now{why}",
                       "add --overwrite to make it again (the old run is moved aside, nothing is deleted), or pick another --run")
    return True


# -- the folder ----------------------------------------------------------------------------------------


def check_claim_options(path: Path, command: str, ckpt_path: str | None, overwrite: bool) -> bool:
    """Refuse --overwrite where it cannot apply; return whether the command would start a new run in `path`
    (a fit that neither resumes nor moves the old run aside), which must then find it empty (refuse_mixing)."""
    fitting = command.endswith("fit")
    if overwrite and not fitting:
        raise KTMError(f"--overwrite is only for `ktm fit` (got `{command}`)",
                       f"drop --overwrite: `{command}` adds its numbers to the run's metrics.json")
    resuming = ckpt_path is not None and (str(ckpt_path) in SPECIAL_CKPT or _inside(ckpt_path, path))
    if overwrite and resuming:
        raise KTMError(f"--overwrite with --ckpt_path {ckpt_path}, which is inside the run folder {path} it would move aside",
                       "drop --overwrite to resume that run, or drop --ckpt_path to start it afresh")
    return fitting and not resuming and not overwrite


def refuse_mixing(path: Path, ckpt_path: str | None = None) -> None:
    """A new fit (not a resume, no --overwrite) into a folder that already holds a run would mix with it: refused."""
    present = run_contents(path)
    if present:
        hint = _resume_hint(path) if ckpt_path is None else f"to start from {ckpt_path}, "
        raise KTMError(
            f"run folder {path} already holds a run ({', '.join(present)}); a new fit there would mix with it",
            f"{hint}pick another --run, or add --overwrite to move the old run aside to "
            f"{path.name}{ASIDE_MARK}<time> (nothing is deleted)")


class RunFolder:
    """The run folder one `ktm fit`/`validate`/`test` claimed (rank zero only): checked and locked by
    `claim`, started by `begin` (fit: once every check passed), released by `release`."""

    def __init__(self, path: Path, command: str, overwrite: bool = False):
        self.path = Path(path)
        self.command = command
        self.overwrite = overwrite
        self.moved_to: Path | None = None
        self.begun = False
        self._lock = RunLock(self.path)
        self._created: Path | None = None  # the highest folder this command created (removed again if unused)
        self._existing: set[str] = set()  # what the folder held when claimed: anything else is this command's

    @classmethod
    def claim(cls, root: str | os.PathLike, experiment: str, run: str, *, command: str = "ktm fit",
              ckpt_path: str | None = None, overwrite: bool = False) -> RunFolder:
        """Check the names, lock the folder, and refuse a fit that would mix with the run it holds."""
        path = run_path(root, experiment, run)
        fitting = command.endswith("fit")
        mixing_matters = check_claim_options(path, command, ckpt_path, overwrite)
        folder = cls(path, command, overwrite=overwrite and fitting)
        folder._lock_it()
        try:
            if mixing_matters:  # checked under the lock: nobody adds a run in between
                refuse_mixing(path, ckpt_path)
        except BaseException:
            folder.release()
            raise
        return folder

    def _lock_it(self) -> None:
        missing = None
        for parent in [self.path, *self.path.parents]:
            if parent.exists():
                break
            missing = parent
        self._lock.acquire(self.command)
        self._created = missing
        self._existing = {p.name for p in self.path.iterdir()}

    def _strays(self, folder: Path) -> list[Path]:
        """What this command wrote into `folder` before the run began (TensorBoard opens its event file when
        the trainer sets up, before the checks that may still fail). Never the files that make a run."""
        return [p for p in folder.iterdir() if p.name not in self._existing and p.name not in (LOCK_NAME, *RUN_FILES)]

    @staticmethod
    def _remove(paths: list[Path]) -> None:
        for p in paths:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def begin(self) -> Path | None:
        """The run starts writing (every check passed). With --overwrite, the run the folder held is moved
        aside first; returns where to (None if nothing was moved). A file this command already had open in
        the folder (TensorBoard's writer) must be closed before, or it would keep writing into the old run."""
        if self.begun:
            return self.moved_to
        self.begun = True
        if not (self.overwrite and run_contents(self.path)):
            return None
        aside = aside_path(self.path)
        strays = [p.name for p in self._strays(self.path)]
        try:
            os.rename(self.path, aside)  # the held lock file goes along: nobody can take the old run meanwhile
        except OSError as exc:
            raise KTMError(f"cannot move the previous run {self.path} aside to {aside} ({exc.strerror or exc})",
                           "move or rename it yourself, then run again without --overwrite") from None
        self._remove([aside / name for name in strays])  # the new run's, not the old one's
        self._existing = set()
        old_lock, self._lock = self._lock, RunLock(self.path)
        try:
            self._lock.acquire(self.command)
        finally:
            old_lock.path = aside / LOCK_NAME
            old_lock.release()
        self.moved_to = aside
        log.info("--overwrite: moved the previous run %s aside to %s", self.path, aside)
        return aside

    def release(self) -> None:
        """Unlock; remove what this command wrote if the run never began (a fit whose check failed), and the
        folder itself if this command created it and it holds no run."""
        if self.command.endswith("fit") and not self.begun and self.path.is_dir():
            self._remove(self._strays(self.path))
        self._lock.release()
        created = self._created
        if created is None or not self.path.is_dir() or run_contents(self.path):
            return
        shutil.rmtree(self.path, ignore_errors=True)  # a folder of ours that never held a run (hparams.yaml at most)
        for parent in self.path.parents:  # and the empty experiment/root folders made on the way
            if not parent.is_relative_to(created):
                break
            try:
                parent.rmdir()
            except OSError:
                break
