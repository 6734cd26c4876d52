"""Callbacks: throughput, run outputs (metrics JSON + exported model + TensorBoard's views to compare K), and a
resumable checkpoint on Ctrl-C or SIGTERM.

Every number written here comes from the run itself; files are written atomically with checksums.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

import lightning as L
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only

from ktm.curves import k_scalars
from ktm.environment import environment
from ktm.errors import KTMError
from ktm.io import read_json, write_json, write_text
from ktm.memory import machine_bytes, release_freed_heap, rss_bytes
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

    NAMES = ("samples_per_s", "prompt_tokens_per_s", "merged_tokens_per_s")  # speed/k<K>/<name>

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
            stats = dict(zip(self.NAMES, (samples / dt, prompt / dt, merged / dt)))
            for name, value in stats.items():
                pl_module.log(f"speed/k{k}/{name}", value, rank_zero_only=True)
            self.summary[f"k{k}"] = stats
        self._acc = {}


# -- TensorBoard: every K in one chart ---------------------------------------------------------------------
BY_K = "by_k"  # <run>/by_k/k<K>/: one TensorBoard run per K, holding val/<metric> and test/<metric> of that K

# Metric names shown first in TensorBoard's comparison views (the rest follow alphabetically); counts are left out.
_FIRST = ("balanced_accuracy", "accuracy", "majority_baseline", "pl_f1", "perplexity", "perplexity_vs_base", "performance",
          "compression", "exact_match", "line_similarity")
_COUNTS = ("examples", "generated")
_GENERATION = ("exact_match", "line_similarity")  # test only, with model.generate_eval_examples > 0 (module.generation_scores)


def _ordered(names) -> list[str]:
    names = [n for n in dict.fromkeys(names) if n not in _COUNTS]
    return [n for n in _FIRST if n in names] + sorted(n for n in names if n not in _FIRST)


def k_layout(val: list[str], test: list[str], train: list[str], speed: list[str]):
    """TensorBoard's Custom Scalars layout: one chart per metric with one line per K.

    val/test charts match `val/<metric>` (`^val/balanced_accuracy$`), which only the per-K runs <run>/by_k/k<K>
    hold: TensorBoard colours lines by run, so each K gets its own colour. train/speed charts match every K's
    tag of the run itself (`^train/k\\d+/loss$`): one colour, a marker per K (the K mostly train at different
    steps). Built from names only, so runs with the same metric have identical charts, which TensorBoard
    merges: a sweep (one K per run) or several seeds show in the same charts."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    def chart(title: str, regex: str):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    def category(title: str, charts: list, closed: bool = False):
        return layout_pb2.Category(title=title, chart=charts, closed=closed)

    categories = [
        category("val: one line per K (runs <run>/by_k/k<K>)", [chart(f"val/{n}", f"^val/{re.escape(n)}$") for n in val]),
        category("test: one point per K, at the step of the tested checkpoint", [chart(f"test/{n}", f"^test/{re.escape(n)}$") for n in test]),
        category("train: one line per K (the K of each step)", [chart(f"train/k*/{n}", rf"^train/k\d+/{re.escape(n)}$") for n in train]),
        category("speed: training throughput, one line per K", [chart(f"speed/k*/{n}", rf"^speed/k\d+/{re.escape(n)}$") for n in speed],
                 closed=True),
    ]
    return layout_pb2.Layout(category=[c for c in categories if c.chart])


def _layout_summary(layout):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar.metadata import CONFIG_SUMMARY_TAG, create_summary_metadata

    tensor = TensorProto(dtype="DT_STRING", string_val=[layout.SerializeToString()], tensor_shape=TensorShapeProto())
    return Summary(value=[Summary.Value(tag=CONFIG_SUMMARY_TAG, tensor=tensor, metadata=create_summary_metadata())])


def _hparam_values(trainer: L.Trainer, pl_module) -> dict[str, bool | float | str]:
    """The run's settings as TensorBoard HParams: model.*, data.*, trainer.* and seed, nested mappings flattened
    (model.lora.r), lists and per-K mappings as one text value ({1: 0.001, 2: 0.0003}), None as 'null'."""
    import dataclasses

    out: dict[str, bool | float | str] = {}

    def put(key: str, value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        per_k = isinstance(value, dict) and value and all(isinstance(k, int) or str(k).isdigit() for k in value)
        if per_k:  # {1: 1e-3, '2': 3e-4} (config.yaml writes the keys as text): one value, written alike in every run
            out[key] = "{" + ", ".join(f"{int(k)}: {v}" for k, v in sorted(value.items(), key=lambda kv: int(kv[0]))) + "}"
        elif isinstance(value, dict) and value:
            for k, v in value.items():
                put(f"{key}.{k}", v)
        elif isinstance(value, (bool, str)):
            out[key] = value
        elif isinstance(value, (int, float)):
            out[key] = float(value)
        else:
            out[key] = "null" if value is None else str(value)

    dm = trainer.datamodule
    for prefix, hparams in (("model", pl_module.hparams), ("data", getattr(dm, "hparams", None) or {})):
        for name, value in dict(hparams).items():
            if not name.startswith("_"):  # LightningCLI's _instantiator
                put(f"{prefix}.{name}", value)
    for name in ("max_epochs", "max_steps", "precision", "accumulate_grad_batches", "world_size"):
        put(f"trainer.{name}", getattr(trainer, name, None))
    seed = os.environ.get("PL_GLOBAL_SEED")
    put("seed", int(seed) if seed and seed.lstrip("-").isdigit() else seed)
    return out


def _hparams_summary(tag: str, **data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.plugins.hparams.metadata import NULL_TENSOR, create_summary_metadata

    meta = create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta, tensor=NULL_TENSOR)])


def event_tags(folder: Path, wanted: set[str] | None = None) -> set[str]:
    """The summary tags in `folder`'s own event files (not its subfolders'), or those of `wanted`."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags: set[str] = set()
    for path in sorted(folder.glob("events.out.tfevents.*")):
        try:
            for event in EventFileLoader(str(path)).Load():
                tags |= {v.tag for v in event.summary.value if wanted is None or v.tag in wanted}
        except Exception as exc:  # noqa: BLE001  (a damaged events file: count what was read)
            log.debug("could not read %s: %s", path, exc)
    return tags


class ProfileSteps(L.Callback):
    """Opt-in: the wall time of training steps [start, start + steps), and with profile=True torch.profiler's operator
    table over them (self CPU time first), written to <run>/profile.txt. For finding what a step spends its time on:
    `ktm fit ... --trainer.callbacks+=ktm.training.callbacks.ProfileSteps --trainer.max_steps=20`. It starts after
    `start` steps so that warm-up (first allocations, kernels picked) stays out. The profiler adds a few microseconds
    to every operator, which inflates code made of many small ones: compare variants with profile=False."""

    def __init__(self, start: int = 8, steps: int = 10, profile: bool = True, row_limit: int = 40):
        self.start, self.steps, self.profile, self.row_limit = start, steps, profile, row_limit
        self._profiler = None
        self._began: float | None = None  # while timing
        self._done = False  # once per fit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and self._began is None and not self._done and trainer.is_global_zero:
            if self.profile:
                from torch.profiler import ProfilerActivity, profile

                self._profiler = profile(activities=[ProfilerActivity.CPU])
                self._profiler.__enter__()
            self._began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._began is None or trainer.global_step < self.start + self.steps:
            return
        seconds, done = time.perf_counter() - self._began, trainer.global_step - self.start
        self._began, self._done = None, True
        head = f"training steps {self.start}-{trainer.global_step - 1}: {seconds:.2f} s, {1000 * seconds / done:.0f} ms per step"
        table = ""
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.row_limit, max_name_column_width=60)
            self._profiler = None
        path = write_text(run_dir(trainer) / "profile.txt", f"{head}\n{table}\n")
        log.info("%s (%s)", head, path)


class TensorBoardViews:
    """What the run's TensorBoard events need so that K (and runs) compare at a glance; RunOutputs calls it.

    - One TensorBoard run per K, <run>/by_k/k<K>, with that K's `val/<metric>` (at each validation, at the step
      Lightning logs `val/k<K>/<metric>`) and `test/<metric>`: one chart per metric then shows every K as its
      own coloured line, in the Scalars tab and in Custom Scalars. The run's own `val/k<K>/<metric>` tags stay.
    - Custom Scalars: k_layout, once per run, at the first validation.
    - HParams: the run's settings (a session start, once per run, when training starts) and its end (fit end).
      No experiment summary: TensorBoard then takes the union of every run's settings, and the last value of
      every scalar as the metric columns, i.e. the final val/test numbers; one run's experiment summary would
      decide the columns of all (a sweep's other K would be missing).
    - `ktm test` / `ktm validate`: their scalars at the step the evaluated checkpoint was trained to (not at
      step 0 before training, and without an `epoch` point that would hide the training's), named as the
      module logged them (test/k4/accuracy, ...); the module keeps them out of Lightning's logger.

    "Once per run": the run's earlier event files (a resumed fit, a later `ktm test`) are read for it first."""

    def __init__(self):
        self._tags: set[str] | None = None  # our once-per-run tags the run has (its event files + this process)
        self._k_writers: dict[int, Any] = {}

    @staticmethod
    def logger(trainer: L.Trainer):
        from lightning.pytorch.loggers import TensorBoardLogger

        return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)

    def _has(self, trainer: L.Trainer, tag: str) -> bool:
        if self._tags is None:
            from tensorboard.plugins.custom_scalar.metadata import CONFIG_SUMMARY_TAG
            from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG, SESSION_START_INFO_TAG

            self._tags = event_tags(run_dir(trainer), {CONFIG_SUMMARY_TAG, SESSION_START_INFO_TAG, SESSION_END_INFO_TAG})
        return tag in self._tags

    def _add_once(self, trainer: L.Trainer, tag: str, make_summary) -> None:
        logger = self.logger(trainer)
        if logger is None or self._has(trainer, tag):
            return
        writer = logger.experiment
        writer._get_file_writer().add_summary(make_summary())  # as Lightning's own log_hyperparams does
        writer.flush()
        self._tags.add(tag)

    def session_start(self, trainer: L.Trainer, pl_module, start_time: float) -> None:
        from tensorboard.plugins.hparams import plugin_data_pb2
        from tensorboard.plugins.hparams.metadata import SESSION_START_INFO_TAG

        def summary():
            info = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
            for name, value in _hparam_values(trainer, pl_module).items():
                if isinstance(value, bool):
                    info.hparams[name].bool_value = value
                elif isinstance(value, float):
                    info.hparams[name].number_value = value
                else:
                    info.hparams[name].string_value = value
            return _hparams_summary(SESSION_START_INFO_TAG, session_start_info=info)

        self._add_once(trainer, SESSION_START_INFO_TAG, summary)

    def session_end(self, trainer: L.Trainer) -> None:
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from tensorboard.plugins.hparams.metadata import SESSION_END_INFO_TAG

        self._add_once(trainer, SESSION_END_INFO_TAG, lambda: _hparams_summary(
            SESSION_END_INFO_TAG, session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())))

    def layout(self, trainer: L.Trainer, pl_module) -> None:
        from tensorboard.plugins.custom_scalar.metadata import CONFIG_SUMMARY_TAG

        results = getattr(pl_module, "results", {})
        if not (results.get("val") or results.get("test")):
            return
        val = _ordered(name for values in (results.get("val") or results["test"]).values() for name in values)
        test = _ordered(name for values in results.get("test", {}).values() for name in values)
        if not test:  # written during fit: test will report what val does (+ generation scores when asked for)
            test = _ordered([*val, *(_GENERATION if pl_module.hparams.get("generate_eval_examples") else ())])
        model = pl_module.model
        train = ["loss"]
        if any(k > 1 for k in model.ks) and getattr(model.compressor, "uses_encoder", False):
            train.append("encoder_correction_ratio")
        if pl_module.hparams.get("distill_weight"):
            train += ["distill_kl"]
        if pl_module.hparams.get("distill_hidden_weight"):
            train += ["distill_hidden"]
        if pl_module.hparams.get("distill_weight") or pl_module.hparams.get("distill_hidden_weight"):
            train += ["target_loss"]
        self._add_once(trainer, CONFIG_SUMMARY_TAG, lambda: _layout_summary(k_layout(val, test, train, list(Throughput.NAMES))))

    def per_k(self, trainer: L.Trainer, split: str, per_k: dict[int, dict[str, float]], step: int) -> None:
        """`<split>/<metric>` of each K into its run <run>/by_k/k<K>."""
        if self.logger(trainer) is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        for k, values in sorted(per_k.items()):
            writer = self._k_writers.get(k)
            if writer is None:
                writer = self._k_writers[k] = SummaryWriter(str(run_dir(trainer) / BY_K / f"k{k}"))
            for name, value in values.items():
                writer.add_scalar(f"{split}/{name}", float(value), step)
            writer.flush()

    def evaluation(self, trainer: L.Trainer, pl_module, split: str) -> None:
        """`ktm test` / `ktm validate`: the split's metrics as logged by the module, at the trained step."""
        logger = self.logger(trainer)
        step = trained_step(trainer, pl_module)
        prefixes = (f"{split}/", f"{split}_stage/")
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith(prefixes)}
        for lg in trainer.loggers:  # TensorBoard, and any other logger configured, get the same points
            lg.log_metrics(metrics, step=step)
        if logger is not None:
            logger.experiment.flush()
        self.per_k(trainer, split, pl_module.results.get(split, {}), step)

    def close(self) -> None:
        for writer in self._k_writers.values():
            writer.close()
        self._k_writers = {}


def backfill_k_views(folder: str | os.PathLike) -> list[int]:
    """Give a run folder written before TensorBoardViews existed its per-K runs (<run>/by_k/k<K>, unless it has
    them) and its Custom Scalars layout (unless it has one), from its own `val|test/k<K>/<metric>` scalars. Test
    points go to metrics.json's global_step (the old events hold them at step 0). Returns the K written."""
    from tensorboard.plugins.custom_scalar.metadata import CONFIG_SUMMARY_TAG
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(folder)
    points: dict[tuple[str, int, str], list[tuple[int, float]]] = {}  # (split, K, metric) -> [(step, value)]
    names: dict[str, list[str]] = {"val": [], "test": [], "train": [], "speed": []}
    for (split, k, name), rows in k_scalars(folder).items():
        names[split].append(name)
        if split in ("val", "test"):
            points[(split, k, name)] = [(s, v) for _, s, v in rows]
    step = None
    with suppress(KTMError, OSError):
        step = read_json(folder / "metrics.json", "metrics file").get("global_step")
    written: set[int] = set()
    if not (folder / BY_K).exists():
        writers: dict[int, Any] = {}
        for (split, k, name), values in sorted(points.items()):
            writer = writers.get(k) or writers.setdefault(k, SummaryWriter(str(folder / BY_K / f"k{k}")))
            for s, v in values:
                writer.add_scalar(f"{split}/{name}", v, step if split == "test" and step is not None and s == 0 else s)
        for writer in writers.values():
            writer.close()
        written = set(writers)
    if (names["val"] or names["test"]) and not event_tags(folder, {CONFIG_SUMMARY_TAG}):
        layout = k_layout(_ordered(names["val"] or names["test"]), _ordered(names["test"] or names["val"]),
                          _ordered(names["train"]), _ordered(names["speed"]))
        writer = SummaryWriter(str(folder))
        writer._get_file_writer().add_summary(_layout_summary(layout))
        writer.close()
    return sorted(written)


def trained_step(trainer: L.Trainer, pl_module) -> int:
    """The optimizer step the evaluated weights were trained to: fit's own step; for `ktm test`/`validate` (a
    fresh trainer at step 0) that of the checkpoint they loaded, or 0 without one (an untrained model)."""
    if trainer.state.fn == "fit":
        return trainer.global_step
    step = getattr(pl_module, "trained_step", None)
    return int(step) if step is not None else trainer.global_step


def logged_step(trainer: L.Trainer) -> int:
    """The x Lightning gives what a fit logs now (it counts batches that stepped; 0-based at an epoch's end)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def planned_steps(trainer: L.Trainer) -> float:
    """The optimizer steps a fit plans: trainer.max_steps, else max_epochs' worth of batches (inf: no end)."""
    return trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches


def timer_of(trainer) -> Timer | None:
    """The Timer Lightning adds for trainer.max_time (None without a cap)."""
    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def time_left(trainer) -> float | None:
    """Seconds trainer.max_time leaves the training loop (None without a cap)."""
    timer = timer_of(trainer)
    return timer.time_remaining("train") if timer is not None else None


def why_fit_stopped(trainer: L.Trainer) -> str:
    """What ended a fit that ran to its end (not a signal): "max_steps" or "max_epochs" (it ran its budget),
    "val_rule" (the curriculum's val rule finished it), "max_time" (the wall-clock cap cut it short of its budget,
    so a faster machine makes another model), or "other" (a callback asked it to stop).
    Lightning counts an epoch cut short as done, so epochs say nothing here: the budget is in steps."""
    if 0 < trainer.max_steps <= trainer.global_step:
        return "max_steps"
    if trainer.global_step >= planned_steps(trainer) or not trainer.should_stop:  # the loop ran out of epochs
        return "max_epochs"
    if getattr(trainer.datamodule, "finished", False):
        return "val_rule"
    remaining = time_left(trainer)
    return "max_time" if remaining is not None and remaining <= 0 else "other"


def say_time_cap_bound(trainer: L.Trainer, folder: Path) -> None:
    """One warning line where trainer.max_time ended a fit short of its budget: its model is not the recipe's,
    and the command that trains the whole budget anew."""
    planned = planned_steps(trainer)
    of = f" of {int(planned)} planned" if math.isfinite(planned) else ""
    minutes, seconds = divmod(int(timer_of(trainer)._duration or 0), 60)
    cap = f"{minutes // 1440:02d}:{minutes // 60 % 24:02d}:{minutes % 60:02d}:{seconds:02d}"  # as config.yaml writes it
    # Not a resume: Lightning counts the epoch the cap cut as done, so a resumed fit would stop at once.
    log.warning("trainer.max_time %s ended this fit at step %d%s, so its model is not the one its step budget makes "
                "(a faster machine's); to train the whole budget (this run is kept aside): ktm fit --config %s "
                "--trainer.max_time=null --overwrite", cap, trainer.global_step, of, folder / "config.yaml")


class RunOutputs(L.Callback):
    """Writes <run>/metrics.json (val + test per K, data info, curriculum, speed, versions and hardware) and <run>/export/
    (KTMModel.from_pretrained loads it) at the end of fit and test, and TensorBoard's views to compare K
    (TensorBoardViews: a TensorBoard run per K under <run>/by_k/, a Custom Scalars layout, HParams, and test/validate
    scalars at the trained step)."""

    def __init__(self, export: bool = True, tensorboard: bool = True):
        self.export = export
        self.started = time.time()
        self.fit_seconds_before = 0.0  # earlier sessions of a resumed fit, up to the checkpoint it resumed from
        self.views = TensorBoardViews() if tensorboard else None

    def state_dict(self) -> dict[str, float]:
        # In every checkpoint, so that wall_seconds.fit of a resumed run counts all its sessions, not the last one.
        return {"fit_seconds": self.fit_seconds_before + time.time() - self.started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fit_seconds_before = float(state.get("fit_seconds", 0.0))

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
            # Which checkpoint those numbers are of: `ktm test --ckpt_path X` may evaluate another than the run's model.
            if phase == "fit":
                doc.get("evaluated", {}).pop("val", None)  # the fit's own validation: the run's model
            elif trainer.ckpt_path:
                doc.setdefault("evaluated", {})[split_name] = Path(trainer.ckpt_path).name
        info = dm.splits(dm.stage).info
        doc["data"] = {"benchmark": dm.benchmark.name, "task": dm.benchmark.task, "stage": dm.stage,
                       "stages": dm.stages, "source": info.get("source"), "info": info}
        doc["curriculum"] = {**dm.state_dict(), "k": dm.current_k(pl_module.model.ks[-1]), "k_schedule": dm.k_schedule}
        doc["model"] = pl_module.model.metadata()
        doc["truncated_prompts"] = pl_module.model.truncated_prompts
        speed = next((c.summary for c in trainer.callbacks if isinstance(c, Throughput)), None)
        if speed:
            doc.setdefault("speed", {}).update(speed)
        before = self.fit_seconds_before if phase == "fit" else 0.0
        doc.setdefault("wall_seconds", {})[phase] = round(before + time.time() - self.started, 1)
        # Per phase like wall_seconds: `ktm test` is its own process and may run on another machine.
        doc.setdefault("environment", {})[phase] = environment()
        if phase == "fit":  # a later `ktm test` starts a fresh trainer at step 0
            doc["global_step"] = trainer.global_step
            planned = planned_steps(trainer)
            doc["stop"] = {"by": why_fit_stopped(trainer), "planned_steps": int(planned) if math.isfinite(planned) else None}
            if pl_module.selected:
                doc["selected"] = pl_module.selected
            if pl_module.encoder_watch:
                doc["encoder_watch"] = {f"k{k}": v for k, v in sorted(pl_module.encoder_watch.items())}
        write_json(path, doc)
        write_report(folder)
        if self.export and phase == "fit":
            pl_module.model.save(folder / "export", extra={"run": str(folder)})
            log.info("exported the model to %s (ktm generate --ckpt %s \"...\")", folder / "export", folder / "export")

    @rank_zero_only
    def _views(self, trainer: L.Trainer, pl_module, phase: str) -> None:
        if self.views is None:
            return
        try:
            if phase in ("test", "validate"):
                self.views.evaluation(trainer, pl_module, "test" if phase == "test" else "val")
            elif phase == "validation":
                self.views.per_k(trainer, "val", pl_module.results.get("val", {}), logged_step(trainer))
            self.views.session_start(trainer, pl_module, self.started)
            self.views.layout(trainer, pl_module)
            if phase == "fit_end":
                self.views.session_end(trainer)
        except Exception as exc:  # noqa: BLE001  (TensorBoard's extras never fail a run: say so in one line)
            log.warning("could not write the TensorBoard comparison views: %s", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)

    def on_train_start(self, trainer, pl_module) -> None:
        self._views(trainer, pl_module, "train_start")  # the run shows in the HParams table while it trains

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.views is not None:
            self.views.close()

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "fit")
        if trainer.is_global_zero and why_fit_stopped(trainer) == "max_time":
            say_time_cap_bound(trainer, run_dir(trainer))
        self._views(trainer, pl_module, "fit_end")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, "test")
        self._views(trainer, pl_module, "test")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, "validate")
            self._views(trainer, pl_module, "validate")
        elif trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._views(trainer, pl_module, "validation")  # the first one writes the layout


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


class ValidateAtMaxSteps(L.Callback):
    """Lightning validates at an epoch's end, or when asked to stop (max_time, early stopping), but not when
    `trainer.max_steps` ends an epoch early: a run capped by steps would end with no val metrics and no
    epoch line. Asking it to stop at the last step makes it validate first, as max_time does."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


PROGRESS_EVERY_S = 120.0  # a progress line this often while stderr is not a terminal (a redirected log)


class EpochLog(L.Callback):
    """One line per validation (epoch end) on the ktm logger: step, K, training loss, the val metrics per
    K, elapsed time. Shows in a redirected log, where the progress bar writes nothing until the end; there,
    a progress line every PROGRESS_EVERY_S also says how far a long epoch has got (step of the planned
    steps, K, the step's loss, and the time left at this session's pace), so a slow run never looks hung. And
    once, a warning where the pace of the final phase says trainer.max_time will cut the fit short."""

    def __init__(self):
        self._start = self._last = self._pace_start = time.monotonic()
        self._first_step = 0
        self._cap_checked, self._final_since = False, None  # _check_the_cap's state: (time, step) its phase began

    def _check_the_cap(self, trainer, now: float) -> None:
        """One warning where trainer.max_time will end the fit short of its planned steps at the pace of its final
        phase (the curriculum's last K entry and stage: a K=1 epoch first is slower than the K=4 rest), measured
        over PROGRESS_EVERY_S of that phase: a slower machine than the recipe's, whose model is not the recipe's."""
        curriculum = getattr(getattr(trainer, "datamodule", None), "curriculum", None)
        if curriculum is not None and not (curriculum.k_schedule_done() and curriculum.stage_index == len(curriculum.stages) - 1):
            return
        if self._final_since is None:
            self._final_since = (now, trainer.global_step)
            return
        (since, first), step = self._final_since, trainer.global_step
        if now - since < PROGRESS_EVERY_S or step <= first:
            return
        self._cap_checked = True
        remaining = time_left(trainer)
        planned, per_step = planned_steps(trainer), (now - since) / (step - first)
        if remaining is not None and math.isfinite(planned) and (planned - step) * per_step > remaining:
            log.warning("at this pace (%.1f s a step) trainer.max_time ends this fit near step %d of %d planned, so its "
                        "model will not be the one its step budget makes; for that, stop it and run it again with "
                        "--trainer.max_time=null (or a longer cap)", per_step, step + int(remaining / per_step), int(planned))

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = self._last = time.monotonic()
        if trainer.is_global_zero:  # trainer.precision: null picks it per machine; say what it picked
            log.info("training in %s precision on %s, %s attention, frozen base linears in %s", trainer.precision,
                     trainer.accelerator.__class__.__name__, pl_module.model.attention,  # model.attention
                     str(pl_module.model.frozen_linear_dtype).removeprefix("torch."))

    def on_train_start(self, trainer, pl_module) -> None:
        # A resumed run's pace counts from the step it resumed at: Lightning restores global_step after on_fit_start.
        self._pace_start, self._first_step = time.monotonic(), trainer.global_step

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if not self._cap_checked:
            self._check_the_cap(trainer, now)
        if now - self._last < PROGRESS_EVERY_S or sys.stderr.isatty():
            return
        self._last = now
        step, elapsed = trainer.global_step, now - self._start
        planned = planned_steps(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        parts = [f"step {step}" + (f"/{int(planned)}" if math.isfinite(planned) else ""), f"K={pl_module.current_k()}",
                 f"loss {float(loss):.3f}" if loss is not None else "loss -", f"{elapsed:.0f} s"]
        done = step - self._first_step
        if done > 0 and math.isfinite(planned) and planned > step:
            parts.append(f"about {(planned - step) * (now - self._pace_start) / done / 60:.0f} min left at this pace")
        remaining = time_left(trainer)
        if remaining is not None:
            parts.append(f"max_time stops it in {remaining / 60:.0f} min")
        log.info("progress: " + " | ".join(parts))

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        self._last = time.monotonic()  # the epoch line just said where the run is
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


class ReleaseFreedMemory(L.Callback):
    """After a batch, when the process's RSS is above `above` of the machine's memory and has grown by more than
    `growth` of it since the last release, hand the heap that glibc holds but nothing uses back to the OS
    (ktm.memory: it ratchets up with batches of very different lengths until the OOM killer ends the run).
    Reading the RSS costs microseconds, so a run whose memory stays low never pays for a release; a release costs
    the pages the next step faults back in (measured on read_commitpack_k2, 24 GiB, where it follows most steps:
    +13% a step, largest RSS 12 GB; released only after 6 GB of growth, 18 GB). `growth` keeps a run whose live
    memory is large from releasing after every step. With several processes on a node (DDP), each judges by its
    share of the machine. A no-op without /proc or glibc."""

    def __init__(self, above: float = 0.25, growth: float = 0.1):
        self.above, self.growth = above, growth
        self._machine = machine_bytes()  # constant: read once, not after every batch
        self._mark = 0  # the RSS after the last release
        self._released = 0

    def _check(self, trainer) -> None:
        rss = rss_bytes()
        if rss is None or self._machine is None:
            return
        share = self._machine / max(1, getattr(trainer, "num_devices", 1))  # this process's part of the node
        if rss <= self.above * share or rss - self._mark <= self.growth * share:
            return
        if not release_freed_heap():
            return
        self._mark = rss_bytes() or rss
        self._released += 1
        (log.info if self._released == 1 else log.debug)(
            "memory: the RSS grew to %.1f GB; returned the heap malloc held unused to the OS, now %.1f GB "
            "(release %d; each later one is logged at debug level)", rss / 2**30, self._mark / 2**30, self._released)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._check(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._check(trainer)
