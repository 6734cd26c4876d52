"""The curriculum as a plain state machine: which data stage, which K, and when training is done.

It lives apart from KTMDataModule (ktm/training/data.py holds one and delegates to it) so the rules can
be read and tested with plain numbers, without a benchmark, a model or Lightning. It only counts; the
settings are checked by data.check_data_args before one is built.

Curriculum, as in the paper: train on the easiest data stage; after each validation, if the chosen
metric at the current K reaches `advance_threshold` (the last stage: `final_threshold`), move to the
next stage; after `max_rounds` epochs on a stage without reaching it, move on anyway (logged).
Reaching the final threshold on the last stage, at the schedule's last K, stops training.

K curriculum: `k_schedule` lists the K values in order (e.g. [1, 2, 4]). With `k_advance: epoch`
each K lasts `epochs_per_k` epochs; with `k_advance: stage` stage i uses the i-th K. The last K stays.
An entry may be a list of K ("mixed", e.g. [1, [1, 4]]): optimizer steps cycle through its K, so one
LoRA keeps serving every K of the entry (the K=1 row stays a same-budget uncompressed baseline instead
of being forgotten). The curriculum judges a mixed entry by its largest K.

The state (stage, rounds, epochs, finished) goes into checkpoints through state_dict / load_state_dict;
its keys are the checkpoint format, so old checkpoints resume.
"""

from __future__ import annotations

from typing import Any, Sequence


class Curriculum:
    """Settings and state of one run's curriculum (arguments as in KTMDataModule; the rules above)."""

    def __init__(
        self,
        stages: Sequence[str],
        k_schedule: Sequence[int | Sequence[int]] | None = None,
        k_advance: str = "epoch",
        epochs_per_k: int = 1,
        advance_metric: str = "balanced_accuracy",
        advance_threshold: float = 0.85,
        final_threshold: float = 0.95,
        max_rounds: int = 3,
    ):
        self.stages = list(stages)
        self.k_schedule = [list(e) if isinstance(e, (list, tuple)) else e for e in k_schedule] if k_schedule else []
        self._k_entries = [e if isinstance(e, list) else [e] for e in self.k_schedule]  # every entry as a list of K
        self.k_advance, self.epochs_per_k = k_advance, epochs_per_k
        self.advance_metric, self.advance_threshold, self.final_threshold = advance_metric, advance_threshold, final_threshold
        self.max_rounds = max_rounds
        self.stage_index = 0
        self.rounds_in_stage = 0
        self.epochs_done = 0
        self.finished = False

    @property
    def stage(self) -> str:
        return self.stages[self.stage_index]

    def schedule_ks(self) -> list[int]:
        """Every K the schedule uses (mixed entries flattened), sorted."""
        return sorted({k for entry in self._k_entries for k in entry})

    def _entry_index(self) -> int:
        return self.stage_index if self.k_advance == "stage" else self.epochs_done // self.epochs_per_k

    def current_ks(self, default: int) -> list[int]:
        """The K of the current schedule entry (one, or several for a mixed entry)."""
        if not self._k_entries:
            return [default]
        return self._k_entries[min(self._entry_index(), len(self._k_entries) - 1)]

    def current_k(self, default: int) -> int:
        """The K the curriculum judges (the largest of a mixed entry)."""
        return max(self.current_ks(default))

    def train_k(self, step: int, default: int) -> int:
        """K of optimizer step `step`: a mixed entry cycles through its K (global step, so resume and
        every DDP rank agree)."""
        ks = self.current_ks(default)
        return ks[step % len(ks)]

    def k_schedule_done(self) -> bool:
        """True once the K curriculum sits at its last entry (training may only finish then)."""
        if not self.k_schedule:
            return True
        return self._entry_index() >= len(self.k_schedule) - 1

    def after_validation(self, metrics: dict[str, float], k: int) -> list[str]:
        """Update the curriculum after a training epoch's validation; return what happened (for logs)."""
        events = []
        final_k = self.k_schedule_done()  # judged for the epoch that was just validated
        self.epochs_done += 1
        self.rounds_in_stage += 1
        value = metrics.get(self.advance_metric)
        last = self.stage_index == len(self.stages) - 1
        threshold = self.final_threshold if last else self.advance_threshold
        reached = value is not None and value >= threshold
        if last and reached and final_k:
            self.finished = True
            events.append(f"stage {self.stage}: {self.advance_metric} {value:.3f} >= {threshold} at K={k}; curriculum done")
        elif not last and (reached or self.rounds_in_stage >= self.max_rounds):
            why = f"{self.advance_metric} {value:.3f} >= {threshold}" if reached else f"max_rounds={self.max_rounds} reached"
            self.stage_index += 1
            self.rounds_in_stage = 0
            events.append(f"advancing to stage {self.stage} ({why})")
        return events

    def state_dict(self) -> dict[str, Any]:
        # These four keys are what checkpoints hold (under the KTMDataModule entry): keep them.
        return {"stage_index": self.stage_index, "rounds_in_stage": self.rounds_in_stage,
                "epochs_done": self.epochs_done, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_index = state["stage_index"]
        self.rounds_in_stage = state["rounds_in_stage"]
        self.epochs_done = state["epochs_done"]
        self.finished = state["finished"]
