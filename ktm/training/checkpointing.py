"""The run's checkpoints: Lightning's ModelCheckpoint, plus the final state in last.ckpt and, with
`checkpoint.monitor`, the best validation kept as the run's model.

Selection (`--checkpoint.monitor=val/k4/balanced_accuracy --checkpoint.mode=max`): validation numbers of a
few hundred examples swing by several points from one epoch to the next (docs/results.md), so the last epoch is
a noisy pick. With a monitor, the top-k checkpoint is the best validation so far, counted only on the
curriculum's last data stage (an earlier stage validates on other data); at the end of fit it becomes
<run>/checkpoints/best.ckpt (a hard link, no copy), its weights are what the export holds and its
validation is what metrics.json records (`selected`), and `ktm test` without --ckpt_path evaluates it.
Selection reads val only: test stays untouched until the one model is chosen. `val/kmean/<metric>` (the
mean over the evaluated K) selects one checkpoint for every K.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint

from ktm.errors import KTMError
from ktm.io import load_torch, recorded_sha256, write_bytes

log = logging.getLogger("ktm")

# The validation numbers a checkpoint can be selected by, and which way is better.
SELECTABLE = {"balanced_accuracy": "max", "accuracy": "max", "pl_f1": "max", "perplexity": "min"}
MONITOR = re.compile(r"val/k(\d+|mean)/(\w+)")
BEST = "best.ckpt"


def check_monitor(monitor: str | None, mode: str, ks: list[int], eval_ks: list[int] | None, task: str | None = None) -> None:
    """One line for a monitor ktm never logs (for the benchmark's `task`, where known), a K it does not evaluate,
    or a mode that would keep the worst."""
    if monitor is None:
        return
    example = "e.g. --checkpoint.monitor=val/k4/balanced_accuracy --checkpoint.mode=max"
    m = MONITOR.fullmatch(str(monitor))
    if not m or m[2] not in SELECTABLE:
        raise KTMError(f"checkpoint.monitor={monitor!r} is not a validation number ktm selects by: val/k<K>/<metric> or "
                       f"val/kmean/<metric> (the mean over K), metric one of {', '.join(SELECTABLE)}", example)
    if task == "perplexity" and "accuracy" in m[2]:
        raise KTMError(f"checkpoint.monitor={monitor}: this benchmark is scored by perplexity, not accuracy",
                       f"monitor val/k{m[1]}/perplexity with --checkpoint.mode=min")
    evaluated = sorted(set(eval_ks or ks))
    if m[1] != "mean" and int(m[1]) not in evaluated:
        raise KTMError(f"checkpoint.monitor={monitor!r}: K={m[1]} is not evaluated (validation runs K in {evaluated})",
                       f"monitor one of {', '.join(f'val/k{k}/{m[2]}' for k in evaluated)}, or val/kmean/{m[2]}")
    if mode != SELECTABLE[m[2]]:
        raise KTMError(f"checkpoint.mode={mode} with checkpoint.monitor={monitor}: {m[2]} is better when "
                       f"{'higher' if SELECTABLE[m[2]] == 'max' else 'lower'}, so this would keep the worst checkpoint",
                       f"add --checkpoint.mode={SELECTABLE[m[2]]}")


class KTMModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, plus: last.ckpt always holds the final state once training ends (with
    every_n_train_steps Lightning keeps the last *periodic* save as last.ckpt, older than the export); and
    with a monitor, the selection of the module docstring."""

    _last_stage = True  # whether the validation just run was on the curriculum's last data stage
    _validated = False  # a validation ran since the last epoch-end save (its score belongs to the weights now)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        # before the module's hook, which may move the curriculum to the next stage
        dm = trainer.datamodule
        self._last_stage = dm is None or dm.stage_index == len(dm.stages) - 1
        self._validated = trainer.state.fn == "fit"

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        # With a monitor, a candidate is a state right after its validation: a save every_n_train_steps in between
        # would carry the previous validation's score (Lightning's step saves still write last.ckpt)
        if self.monitor is None or (self._validated and self._last_stage):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    # After each validation (in whichever of these two hooks Lightning saves at an epoch's end), with a monitor: the
    # validated state competes even when saves come every_n_train_steps only, and last.ckpt moves on even when it
    # did not improve (Lightning writes last.ckpt there only beside a new top-k file: a resume would lose epochs).
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._after_validation(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._after_validation(trainer)

    def _after_validation(self, trainer) -> None:
        if not (self.monitor and self._validated) or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self._every_n_epochs < 1:
            self._save_topk_checkpoint(trainer, candidates)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, candidates)
        self._validated = False

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if self.monitor:
            self._select(trainer, pl_module)

    def _select(self, trainer, pl_module) -> None:
        """The best checkpoint's weights and validation into the module (the export and metrics.json follow), and
        checkpoints/best.ckpt beside last.ckpt."""
        if not self.best_model_path or not Path(self.best_model_path).is_file():
            log.warning("checkpoint.monitor=%s: no validation on the last data stage to select from; the export is the "
                        "final model", self.monitor)
            return
        ckpt = load_torch(self.best_model_path, "training checkpoint", weights_only=True)
        pl_module.load_state_dict(ckpt["state_dict"], strict=False)
        if ckpt.get("ktm_val"):
            pl_module.results["val"] = {int(k): v for k, v in ckpt["ktm_val"].items()}
        pl_module.selected = {"monitor": self.monitor, "mode": self.mode, "value": float(self.best_model_score),
                              "step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
                              "final_step": int(trainer.global_step), "checkpoint": BEST}
        if trainer.is_global_zero:
            link_best(Path(self.best_model_path))
        log.info("selected the checkpoint of step %d (%s %.4f, best of the run's validations; the final step was %d): "
                 "export and metrics.json hold it, ktm test evaluates %s", pl_module.selected["step"], self.monitor,
                 pl_module.selected["value"], trainer.global_step, BEST)


def link_best(source: Path) -> Path:
    """checkpoints/best.ckpt as a hard link to `source` (a copy where the filesystem has no links), replaced
    atomically, with its checksum sidecar."""
    target = source.with_name(BEST)
    tmp = source.with_name(f".{BEST}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    digest = recorded_sha256(source)
    if digest:
        write_bytes(Path(str(target) + ".sha256"), f"{digest}  {BEST}\n".encode(), checksum=False)
    return target
