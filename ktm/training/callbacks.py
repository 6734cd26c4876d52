"""Callbacks: throughput, run outputs (metrics JSON + exported model), and a resumable checkpoint on Ctrl-C or SIGTERM.

Every number written here comes from the run itself; files are written atomically with checksums.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ktm.environment import environment
from ktm.errors import KTMError
from ktm.io import read_json, write_json
from ktm.report import write_report

log = logging.getLogger("ktm")


def run_dir(trainer: L.Trainer) -> Path:
    # Not trainer.log_dir: it broadcasts across ranks, which hangs when called from rank zero only.
    logger_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
    return Path(logger_dir or trainer.default_root_dir)


class Throughput(L.Callback):
    """Training samples/s and prompt tokens/s (original and merged), logged per K.

    Time is summed per K from each batch's start to the end of its optimizer step, so the steps of a
    mixed K schedule count for their own K, and validation never counts (nor loading, which here only
    hands out text)."""

    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self._t = 0.0
        self._acc: dict[int, list[float]] = {}  # K -> [seconds, prompt tokens, merged tokens, samples]
        self.summary: dict[str, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = getattr(pl_module, "_tokens", None)
        if tokens is None:
            return
        k, *counts = tokens
        acc = self._acc.setdefault(k, [0.0, 0, 0, 0])
        acc[0] += time.perf_counter() - self._t
        for i, v in enumerate(counts, start=1):
            acc[i] += v
        if (batch_idx + 1) % self.every == 0 or batch_idx + 1 == trainer.num_training_batches:
            self._flush(pl_module)

    def _flush(self, pl_module) -> None:
        for k, (dt, prompt, merged, samples) in self._acc.items():
            if dt <= 0:
                continue
            stats = {"samples_per_s": samples / dt, "prompt_tokens_per_s": prompt / dt, "merged_tokens_per_s": merged / dt}
            for name, value in stats.items():
                pl_module.log(f"speed/k{k}/{name}", value, rank_zero_only=True)
            self.summary[f"k{k}"] = stats
        self._acc = {}


class RunOutputs(L.Callback):
    """Writes <run>/metrics.json (val + test per K, data info, curriculum, speed, versions and hardware) and <run>/export/
    (KTMModel.from_pretrained loads it) at the end of fit and test."""

    def __init__(self, export: bool = True):
        self.export = export
        self.started = time.time()

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module, phase: str) -> None:
        folder = run_dir(trainer)
        path = folder / "metrics.json"
        doc: dict[str, Any] = {}
        if path.exists():
            try:
                doc = read_json(path, "metrics file")
            except KTMError as exc:  # never fail a finished run over it: keep the damaged file aside
                aside = path.with_name(f"metrics.unreadable-{int(time.time())}.json")
                os.replace(path, aside)
                log.warning("%s; moved it to %s and wrote a new one", exc.problem, aside)
        dm = trainer.datamodule
        split_name = "test" if phase == "test" else "val"
        results = pl_module.results.get(split_name)
        if results:
            doc[split_name] = {f"k{k}": v for k, v in results.items()}
        info = dm.splits(dm.stage).info
        doc["data"] = {"benchmark": dm.benchmark.name, "task": dm.benchmark.task, "stage": dm.stage,
                       "stages": dm.stages, "source": info.get("source"), "info": info}
        doc["curriculum"] = {**dm.state_dict(), "k": dm.current_k(pl_module.model.ks[-1]), "k_schedule": dm.k_schedule}
        doc["model"] = pl_module.model.metadata()
        doc["truncated_prompts"] = pl_module.model.truncated_prompts
        speed = next((c.summary for c in trainer.callbacks if isinstance(c, Throughput)), None)
        if speed:
            doc.setdefault("speed", {}).update(speed)
        doc.setdefault("wall_seconds", {})[phase] = round(time.time() - self.started, 1)
        # Per phase like wall_seconds: `ktm test` is its own process and may run on another machine.
        doc.setdefault("environment", {})[phase] = environment()
        if phase == "fit":  # a later `ktm test` starts a fresh trainer at step 0
            doc["global_step"] = trainer.global_step
        write_json(path, doc)
        write_report(folder)
        if self.export and phase == "fit":
            pl_module.model.save(folder / "export", extra={"run": str(folder)})
            log.info("exported the model to %s (ktm generate --ckpt %s \"...\")", folder / "export", folder / "export")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")


@contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[list[int]]:
    """Within the block, SIGINT/SIGTERM are only noted (the list yielded), not acted on: a second Ctrl-C or
    SIGTERM cannot cut short the checkpoint save that the first one started. The previous handlers come
    back afterwards; the noted signals are not replayed (the command is stopping already)."""
    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield noted
        return

    def note(signum, frame) -> None:
        if not noted:
            print("ktm: finishing the checkpoint save first", file=sys.stderr, flush=True)
        noted.append(signum)

    previous = {s: signal.signal(s, note) for s in signums}
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class SaveOnInterrupt(L.Callback):
    """Ctrl-C or SIGTERM (timeout, SLURM, Kubernetes, docker stop) during fit: save a resumable checkpoint
    and say how to resume (one line on stderr).

    Lightning raises KeyboardInterrupt at once, and turns SIGTERM into SIGTERMException (a SystemExit
    with code 0) after the training step in flight. `exit_code` is 130 / 143 for the CLI either way,
    `saved` the checkpoint path. Nothing is saved before training started (the run's checkpoints are
    then unchanged), nor by validate/test. A further signal during the save waits for it."""

    def __init__(self):
        self.saved: Path | None = None
        self.exit_code: int | None = None
        self._training = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._training = True

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, KeyboardInterrupt):
            self.exit_code, what = 130, "interrupted"
        elif isinstance(exception, SIGTERMException):
            self.exit_code, what = 143, "stopped by SIGTERM"
        else:
            return
        if trainer.state.fn != "fit" or not self._training:
            if trainer.is_global_zero:
                doing = "training started" if trainer.state.fn == "fit" else f"`ktm {trainer.state.fn}` finished"
                print(f"ktm: {what} before {doing}; nothing was saved (the run's files are as they were)",
                      file=sys.stderr, flush=True)
            return
        folder = run_dir(trainer)
        path = folder / "checkpoints" / "interrupted.ckpt"
        try:
            with signals_deferred():
                trainer.save_checkpoint(path)
        except Exception as exc:  # noqa: BLE001  (say so in one line; the earlier checkpoints are intact)
            print(f"ktm: {what}; could not save {path} ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})",
                  file=sys.stderr, flush=True)
            return
        self.saved = path
        config = folder / "config.yaml"
        print(f"ktm: {what}; saved {path}. Resume with: ktm fit --config {config} --ckpt_path {path}", file=sys.stderr, flush=True)


class ResumableRNG(L.Callback):
    """Saves the global RNG states (torch, numpy, python) in checkpoints and restores them on resume.

    Lightning does not: a resumed run would restart LoRA dropout from the seed's first draw instead of
    where the checkpoint stopped, so it could not reproduce an uninterrupted run. A checkpoint taken
    mid-step (Ctrl-C during forward/backward) stores the states from the start of that batch, since the
    resumed run redoes the batch. Plain lists and tensors, so `torch.load(weights_only=True)` reads them.
    """

    def __init__(self):
        self._trainer = None
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_batch = -1

    @staticmethod
    def collect() -> dict[str, Any]:
        import random

        import numpy as np
        import torch

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._snapshot = self.collect()
        self._snapshot_batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is not None and self._snapshot is not None:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            if progress.ready > progress.processed and self._snapshot_batch == progress.ready:
                return self._snapshot  # the step in flight will be redone: rewind to its start
        return self.collect()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import random

        import numpy as np
        import torch

        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class EpochLog(L.Callback):
    """One line per validation (epoch end) on the ktm logger: step, K, training loss, the val metrics per
    K, elapsed time. Shows in a redirected log, where the progress bar writes nothing until the end."""

    def __init__(self):
        self._start = time.monotonic()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.monotonic()
        if trainer.is_global_zero:  # trainer.precision: null picks it per machine; say what it picked
            log.info("training in %s precision on %s", trainer.precision, trainer.accelerator.__class__.__name__)

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"epoch {trainer.current_epoch}", f"step {trainer.global_step}", f"K={pl_module.current_k()}",
                 f"loss {float(loss):.3f}" if loss is not None else "loss -"]
        for k, values in sorted(pl_module.results.get("val", {}).items()):
            shown = [f"{name} {values[name]:.3f}" for name in ("balanced_accuracy", "perplexity") if name in values]
            parts.append(f"val k{k}: " + ", ".join(shown))
        parts.append(f"{time.monotonic() - self._start:.0f} s")
        log.info(" | ".join(parts))
