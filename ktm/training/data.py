"""KTMDataModule: the benchmark's data plus the curriculum (which data stage, which K).

Curriculum, as in the paper: train on the easiest data stage; after each validation, if the chosen
metric at the current K reaches `advance_threshold` (the last stage: `final_threshold`), move to the
next stage; after `max_rounds` epochs on a stage without reaching it, move on anyway (logged).
Reaching the final threshold on the last stage stops training.

K curriculum: `k_schedule` lists the K values in order (e.g. [1, 2, 4]). With `k_advance: epoch`
each K lasts `epochs_per_k` epochs; with `k_advance: stage` stage i uses the i-th K. The last K stays.
The state (stage, K, rounds) is saved in checkpoints, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset

from ktm.benchmarks import get_benchmark
from ktm.benchmarks.common import Example, balance
from ktm.errors import KTMError

log = logging.getLogger("ktm")


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def collate(examples: list[Example]) -> dict[str, Any]:
    return {"prompts": [e.prompt for e in examples], "targets": [e.target for e in examples],
            "labels": [e.label for e in examples]}


def _subsample(examples: list[Example], n: int | None, seed: int, balanced: bool) -> list[Example]:
    if balanced:
        examples = balance(examples, seed)
    if n is not None and len(examples) > n:
        examples = random.Random(seed).sample(examples, n)
    return examples


class KTMDataModule(L.LightningDataModule):
    def __init__(
        self,
        benchmark: str = "tree",
        benchmark_args: dict[str, Any] | None = None,
        stages: list[str] | None = None,
        k_schedule: list[int] | None = None,
        k_advance: Literal["epoch", "stage"] = "epoch",
        epochs_per_k: int = 1,
        advance_metric: Literal["accuracy", "balanced_accuracy"] = "balanced_accuracy",
        advance_threshold: float = 0.85,
        final_threshold: float = 0.95,
        max_rounds: int = 3,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        balanced_train: bool = True,
        balanced_eval: bool = False,
        max_train_examples: int | None = None,
        max_val_examples: int | None = 500,
        max_test_examples: int | None = 1000,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            benchmark: registered benchmark name (tree, amazon, rotten_tomatoes, commitpack).
            benchmark_args: options passed to the benchmark (its sizes, sources, paths).
            stages: data stages to train on, in order (default: the benchmark's first stage).
            k_schedule: K values in curriculum order, e.g. [1, 2, 4] (default: the model's largest K).
            k_advance: "epoch" (K changes every `epochs_per_k` epochs) or "stage" (with the data stage).
            epochs_per_k: epochs per K entry when k_advance is "epoch".
            advance_metric: validation metric (at the current K) that moves the data stage on.
            advance_threshold: value of advance_metric that moves to the next stage (paper: 0.85).
            final_threshold: value on the last stage that stops training (paper: 0.95).
            max_rounds: epochs on one stage before moving on even below the threshold.
            batch_size / eval_batch_size: examples per step in training / evaluation.
            balanced_train: down-sample train labels to equal counts (classification).
            balanced_eval: also balance val/test (default False: natural distribution, balanced accuracy reported).
            max_train_examples / max_val_examples / max_test_examples: seeded caps per stage (None = all).
            num_workers: DataLoader workers (0 = in the main process; examples are plain text).
            seed: seed of sampling and balancing.
        """
        super().__init__()
        self.save_hyperparameters()
        self.benchmark = get_benchmark(benchmark, seed=seed, **(benchmark_args or {}))
        self.stages = list(stages or self.benchmark.stages[:1])
        bad = [s for s in self.stages if s not in self.benchmark.stages]
        if bad:
            raise KTMError(f"unknown stage(s) {bad} for benchmark {benchmark!r}", f"use some of: {', '.join(self.benchmark.stages)}")
        self.k_schedule = list(k_schedule) if k_schedule else []
        for k in self.k_schedule:
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise KTMError(f"data.k_schedule has an invalid K {k!r}", "K values are whole numbers >= 1, e.g. [1, 2, 4]")
        if epochs_per_k < 1 or max_rounds < 1 or batch_size < 1 or eval_batch_size < 1:
            raise KTMError("data.epochs_per_k, max_rounds, batch_size and eval_batch_size must be >= 1", "fix the data section of the config")
        self.stage_index = 0
        self.rounds_in_stage = 0
        self.epochs_done = 0
        self.finished = False
        self._splits: dict[str, Any] = {}

    # -- curriculum state --------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self.stages[self.stage_index]

    def current_k(self, default: int) -> int:
        if not self.k_schedule:
            return default
        if self.hparams.k_advance == "stage":
            i = self.stage_index
        else:
            i = self.epochs_done // self.hparams.epochs_per_k
        return self.k_schedule[min(i, len(self.k_schedule) - 1)]

    def k_schedule_done(self) -> bool:
        """True once the K curriculum sits at its last entry (training may only finish then)."""
        if not self.k_schedule:
            return True
        if self.hparams.k_advance == "stage":
            return self.stage_index >= len(self.k_schedule) - 1
        return self.epochs_done // self.hparams.epochs_per_k >= len(self.k_schedule) - 1

    def after_validation(self, metrics: dict[str, float], k: int) -> list[str]:
        """Update the curriculum after a training epoch's validation; return what happened (for logs)."""
        events = []
        final_k = self.k_schedule_done()  # judged for the epoch that was just validated
        self.epochs_done += 1
        self.rounds_in_stage += 1
        value = metrics.get(self.hparams.advance_metric)
        last = self.stage_index == len(self.stages) - 1
        threshold = self.hparams.final_threshold if last else self.hparams.advance_threshold
        reached = value is not None and value >= threshold
        if last and reached and final_k:
            self.finished = True
            events.append(f"stage {self.stage}: {self.hparams.advance_metric} {value:.3f} >= {threshold} at K={k}; curriculum done")
        elif not last and (reached or self.rounds_in_stage >= self.hparams.max_rounds):
            why = f"{self.hparams.advance_metric} {value:.3f} >= {threshold}" if reached else f"max_rounds={self.hparams.max_rounds} reached"
            self.stage_index += 1
            self.rounds_in_stage = 0
            events.append(f"advancing to stage {self.stage} ({why})")
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"stage_index": self.stage_index, "rounds_in_stage": self.rounds_in_stage,
                "epochs_done": self.epochs_done, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage_index = state["stage_index"]
        self.rounds_in_stage = state["rounds_in_stage"]
        self.epochs_done = state["epochs_done"]
        self.finished = state["finished"]

    # -- data --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for stage in self.stages:  # builds and caches once (rank 0 only under DDP)
            self.benchmark.load(stage)

    def splits(self, stage: str):
        if stage not in self._splits:
            self._splits[stage] = self.benchmark.load(stage)
        return self._splits[stage]

    def _loader(self, examples: list[Example], batch_size: int, shuffle: bool) -> DataLoader:
        if not examples:
            raise KTMError(f"no examples for stage {self.stage!r} of {self.benchmark.name!r}", "check the data source and the max_*_examples caps")
        return DataLoader(ExampleDataset(examples), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.hparams.num_workers)

    def train_examples(self) -> list[Example]:
        h = self.hparams
        return _subsample(self.splits(self.stage).train, h.max_train_examples, h.seed + self.epochs_done,
                          h.balanced_train and self.benchmark.task == "classification")

    def eval_examples(self, split: str, stage: str | None = None) -> list[Example]:
        h = self.hparams
        cap = h.max_val_examples if split == "val" else h.max_test_examples
        examples = getattr(self.splits(stage or self.stage), split)
        return _subsample(examples, cap, h.seed, h.balanced_eval and self.benchmark.task == "classification")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples(), self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_examples("val"), self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_examples("test"), self.hparams.eval_batch_size, shuffle=False)
