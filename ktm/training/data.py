"""KTMDataModule: the benchmark's data plus the curriculum (which data stage, which K).

The curriculum's rules (advance on a threshold or after max_rounds, finish at the last stage and K,
K per epoch or per stage, mixed entries cycled by step) live in ktm/training/curriculum.py as a plain
class; the DataModule holds one and passes its methods through, since the trainer, the callbacks and
the checkpoints reach the curriculum via `trainer.datamodule`. Its state is saved in checkpoints, so a
resumed run continues where it stopped.

Exact resume: the training order is a permutation drawn from a seed fixed by (data seed, stage, epoch)
(`EpochSampler`), and the training DataLoader implements Lightning's stateful-loader protocol
(`ResumableLoader`): a checkpoint records which epoch order it was in and how many batches were already
trained, and a resumed run skips exactly those. Every DataLoader has its own torch.Generator, so
making an iterator never draws from the global RNG (which LoRA dropout uses): the dropout stream of
a resumed run is the one of an uninterrupted run (ktm.training.callbacks.ResumableRNG restores it).
"""

from __future__ import annotations

import hashlib
import logging
import random
from typing import Any, Callable, Iterator, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ktm.benchmarks import get_benchmark
from ktm.benchmarks.common import Example, balance
from ktm.errors import KTMError, check_count, check_share
from ktm.training.curriculum import Curriculum

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
            "labels": [e.label for e in examples], "cues": [e.meta.get("cue", "") for e in examples],
            "keeps": [e.keep for e in examples]}


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any values, the same in every process (Python's hash() is salted)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochSampler(Sampler[int]):
    """A shuffled order of n items fixed by `seed`: the same seed gives the same order in any process."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A DataLoader that can start part-way through its epoch (Lightning calls state_dict() when it saves
    a checkpoint and load_state_dict() before iterating again on resume).

    `key` names the epoch order (data seed, stage, epoch, examples): a saved position is only applied to
    a loader of the same order, so a checkpoint taken at an epoch's end never cuts the next epoch short.
    `trained` counts the batches the trainer has *finished*, not the ones this loader has handed out:
    Lightning fetches one batch ahead, so the loader's own count would skip a batch never trained on.
    """

    def __init__(self, *args: Any, key: str = "", trained: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.key = key
        self.trained = trained
        self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "trained": int(self.trained()) if self.trained is not None else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("key") == self.key:
            self._skip = int(state.get("trained", 0))
            if self._skip:
                log.info("resuming mid-epoch: skipping the %d batch(es) this epoch already trained on", self._skip)

    def __iter__(self):
        it = super().__iter__()
        skip, self._skip = self._skip, 0  # once: the next epoch starts from its beginning
        for _ in range(skip):  # examples are in-memory text, so skipping costs next to nothing
            if next(it, None) is None:
                break
        return it


def _whole(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int)


def check_data_args(**h: Any) -> None:
    """One-line errors for bad data settings, checked before anything is loaded."""
    for name in ("epochs_per_k", "max_rounds", "batch_size", "eval_batch_size"):
        if name in h:
            check_count(f"data.{name}", h[name], 1, f"set data.{name} to e.g. 1 or more")
    for name in ("train_pool", "max_train_examples", "max_val_examples", "max_test_examples"):
        check_count(f"data.{name}", h.get(name), 1, f"set data.{name} to a count, or null for all", allow_none=True)
    if "num_workers" in h:
        check_count("data.num_workers", h["num_workers"], 0, "set data.num_workers to 0 (main process) or more")
    if "seed" in h and not _whole(h["seed"]):
        raise KTMError(f"data.seed must be a whole number, got {h['seed']!r}", "set data.seed to e.g. 0")
    for name in ("advance_threshold", "final_threshold"):
        if name in h:
            check_share(f"data.{name}", h[name], f"set data.{name} to e.g. 0.85")
    ks = h.get("k_schedule")
    if ks is not None:
        if isinstance(ks, (str, bytes)) or not isinstance(ks, (list, tuple)):
            raise KTMError(f"data.k_schedule must be a list of K values or null, got {ks!r}", "set it to e.g. [1, 2, 4]")
        for entry in ks:
            mixed = entry if isinstance(entry, (list, tuple)) else [entry]
            if not mixed:
                raise KTMError("data.k_schedule has an empty mixed entry []", "a mixed entry lists its K, e.g. [1, [1, 4]]")
            for k in mixed:
                if not _whole(k) or k < 1:
                    raise KTMError(f"data.k_schedule has an invalid K {k!r}", "K values are whole numbers >= 1, e.g. [1, 2, 4] or [1, [1, 4]]")
    stages = h.get("stages")
    if stages is not None and (isinstance(stages, (str, bytes)) or not isinstance(stages, (list, tuple)) or not stages):
        raise KTMError(f"data.stages must be a non-empty list of stage names or null, got {stages!r}", "set it to e.g. [small]")


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
        k_schedule: list[int | list[int]] | None = None,
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
        train_pool: int | None = None,
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
            k_schedule: K values in curriculum order, e.g. [1, 2, 4] (default: the model's largest K); an entry
                may be a list, e.g. [1, [1, 4]], whose K alternate step by step ("mixed").
            k_advance: "epoch" (K changes every `epochs_per_k` epochs) or "stage" (with the data stage).
            epochs_per_k: epochs per K entry when k_advance is "epoch".
            advance_metric: validation metric (at the current K) that moves the data stage on.
            advance_threshold: value of advance_metric that moves to the next stage (paper: 0.85).
            final_threshold: value on the last stage that stops training (paper: 0.95).
            max_rounds: epochs on one stage before moving on even below the threshold.
            batch_size / eval_batch_size: examples per step in training / evaluation.
            balanced_train: down-sample train labels to equal counts (classification).
            balanced_eval: also balance val/test (default False: natural distribution, balanced accuracy reported).
            train_pool: keep only this many training examples of each stage, one seeded draw that stays the
                same every epoch (None = all): a learning curve over the labelled set's size. The
                per-epoch draw of max_train_examples then comes from this pool.
            max_train_examples / max_val_examples / max_test_examples: seeded caps per stage (None = all).
            num_workers: DataLoader workers (0 = in the main process; examples are plain text).
            seed: seed of sampling and balancing.
        """
        super().__init__()
        self.save_hyperparameters()
        check_data_args(**self.hparams)
        if benchmark_args is not None and not isinstance(benchmark_args, dict):
            raise KTMError(f"data.benchmark_args must be a mapping, got {benchmark_args!r}", "write it as {key: value, ...}")
        self.benchmark = get_benchmark(benchmark, seed=seed, **(benchmark_args or {}))
        chosen = list(stages or self.benchmark.stages[:1])
        bad = [s for s in chosen if s not in self.benchmark.stages]
        if bad:
            raise KTMError(f"unknown stage(s) {bad} for benchmark {benchmark!r}", f"use some of: {', '.join(self.benchmark.stages)}")
        self.curriculum = Curriculum(stages=chosen, k_schedule=k_schedule, k_advance=k_advance, epochs_per_k=epochs_per_k,
                                     advance_metric=advance_metric, advance_threshold=advance_threshold,
                                     final_threshold=final_threshold, max_rounds=max_rounds)
        self._splits: dict[str, Any] = {}

    # -- curriculum: read-only views and pass-throughs of self.curriculum (ktm/training/curriculum.py) --
    @property
    def stages(self) -> list[str]:
        return self.curriculum.stages

    @property
    def k_schedule(self) -> list[int | list[int]]:
        return self.curriculum.k_schedule

    @property
    def stage(self) -> str:
        return self.curriculum.stage

    @property
    def stage_index(self) -> int:
        return self.curriculum.stage_index

    @property
    def epochs_done(self) -> int:
        return self.curriculum.epochs_done

    @property
    def finished(self) -> bool:
        return self.curriculum.finished

    def schedule_ks(self) -> list[int]:
        return self.curriculum.schedule_ks()

    def current_ks(self, default: int) -> list[int]:
        return self.curriculum.current_ks(default)

    def current_k(self, default: int) -> int:
        return self.curriculum.current_k(default)

    def train_k(self, step: int, default: int) -> int:
        return self.curriculum.train_k(step, default)

    def after_validation(self, metrics: dict[str, float], k: int) -> list[str]:
        return self.curriculum.after_validation(metrics, k)

    def state_dict(self) -> dict[str, Any]:
        # Lightning stores this under the checkpoint's "KTMDataModule" entry; the curriculum owns its keys.
        return self.curriculum.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.curriculum.load_state_dict(state)

    # -- data --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        for stage in self.stages:  # builds and caches once (rank 0 only under DDP)
            self.benchmark.load(stage)

    def splits(self, stage: str):
        if stage not in self._splits:
            self._splits[stage] = self.benchmark.load(stage)
        return self._splits[stage]

    def _check_nonempty(self, examples: list[Example]) -> None:
        if not examples:
            raise KTMError(f"no examples for stage {self.stage!r} of {self.benchmark.name!r}", "check the data source and the max_*_examples caps")

    def _generator(self, *parts: Any) -> torch.Generator:
        # Own generator: DataLoader draws a base seed per iterator, which would otherwise come from
        # (and shift) the global RNG that dropout uses.
        return torch.Generator().manual_seed(derived_seed(self.hparams.seed, *parts))

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else self.epochs_done

    def _trained_batches(self) -> int:
        """Batches of the current epoch the trainer has run (optimizer step done), for ResumableLoader."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_examples(self) -> list[Example]:
        h = self.hparams
        pool = _subsample(self.splits(self.stage).train, h.train_pool, derived_seed(h.seed, "train_pool"), False)
        return _subsample(pool, h.max_train_examples, h.seed + self.epochs_done,
                          h.balanced_train and self.benchmark.task == "classification")

    def eval_examples(self, split: str, stage: str | None = None) -> list[Example]:
        h = self.hparams
        cap = h.max_val_examples if split == "val" else h.max_test_examples
        examples = getattr(self.splits(stage or self.stage), split)
        return _subsample(examples, cap, h.seed, h.balanced_eval and self.benchmark.task == "classification")

    def train_dataloader(self) -> DataLoader:
        examples = self.train_examples()
        self._check_nonempty(examples)
        epoch = self._epoch()
        # The order depends only on (seed, stage, epoch) and the examples drawn for this epoch, so a
        # resumed run regenerates it; the key lets a saved position apply to this same order only.
        key = f"seed={self.hparams.seed}/stage={self.stage}/epoch={epoch}/done={self.epochs_done}/n={len(examples)}"
        sampler = EpochSampler(len(examples), derived_seed(self.hparams.seed, "train-order", self.stage, epoch))
        return ResumableLoader(ExampleDataset(examples), batch_size=self.hparams.batch_size, sampler=sampler,
                               collate_fn=collate, num_workers=self.hparams.num_workers,
                               generator=self._generator("train", self.stage, epoch), key=key, trained=self._trained_batches)

    def _eval_loader(self, examples: list[Example], split: str) -> DataLoader:
        self._check_nonempty(examples)
        return DataLoader(ExampleDataset(examples), batch_size=self.hparams.eval_batch_size, shuffle=False, collate_fn=collate,
                          num_workers=self.hparams.num_workers, generator=self._generator(split))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_examples("val"), "val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_examples("test"), "test")
