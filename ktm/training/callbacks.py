"""Callbacks: throughput, run outputs (metrics JSON + exported model), and a resumable checkpoint on Ctrl-C.

Every number written here comes from the run itself; files are written atomically with checksums.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ktm.io import read_json, write_json
from ktm.report import write_report

log = logging.getLogger("ktm")


def run_dir(trainer: L.Trainer) -> Path:
    # Not trainer.log_dir: it broadcasts across ranks, which hangs when called from rank zero only.
    logger_dir = getattr(trainer.logger, "log_dir", None) if trainer.logger else None
    return Path(logger_dir or trainer.default_root_dir)


class Throughput(L.Callback):
    """Training samples/s and prompt tokens/s (original and merged), logged per K."""

    def __init__(self, log_every_n_steps: int = 10):
        self.every = log_every_n_steps
        self._t = None
        self._acc = [0, 0, 0]  # prompt tokens, merged tokens, samples
        self.summary: dict[str, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = getattr(pl_module, "_tokens", None)
        if tokens is None:
            return
        for i, v in enumerate(tokens):
            self._acc[i] += v
        if (batch_idx + 1) % self.every == 0 or batch_idx + 1 == trainer.num_training_batches:
            self._flush(pl_module)

    def _flush(self, pl_module) -> None:
        dt = time.perf_counter() - self._t
        k = pl_module.current_k()
        stats = {"samples_per_s": self._acc[2] / dt, "prompt_tokens_per_s": self._acc[0] / dt, "merged_tokens_per_s": self._acc[1] / dt}
        for name, value in stats.items():
            pl_module.log(f"speed/k{k}/{name}", value, rank_zero_only=True)
        self.summary[f"k{k}"] = stats
        self._t, self._acc = time.perf_counter(), [0, 0, 0]

    def on_validation_start(self, trainer, pl_module) -> None:
        self._t, self._acc = None, [0, 0, 0]  # do not count evaluation time as training time


class RunOutputs(L.Callback):
    """Writes <run>/metrics.json (val + test per K, data info, curriculum, speed) and <run>/export/
    (KTMModel.from_pretrained loads it) at the end of fit and test."""

    def __init__(self, export: bool = True):
        self.export = export
        self.started = time.time()

    @rank_zero_only
    def _write(self, trainer: L.Trainer, pl_module, phase: str) -> None:
        folder = run_dir(trainer)
        path = folder / "metrics.json"
        doc: dict[str, Any] = read_json(path, "metrics file") if path.exists() else {}
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


class SaveOnInterrupt(L.Callback):
    """Ctrl-C during fit: save a resumable checkpoint and say how to resume."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        folder = run_dir(trainer)
        path = folder / "checkpoints" / "interrupted.ckpt"
        trainer.save_checkpoint(path)
        config = folder / "config.yaml"
        print(f"ktm: interrupted; saved {path}. Resume with: ktm fit --config {config} --ckpt_path {path}", flush=True)
