"""`ktm fit|validate|test`: LightningCLI with one-line parse errors, settings checked before anything is built,
one run per folder (run_folder.py), atomic checksummed checkpoints and config.yaml.

`ktm/cli.py` expands `--exp` and calls `run`. Every class here is built by `run`; what they share (the command
name, the run folder this command claimed) is handed to them, not read from an enclosing scope.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ktm.benchmarks import REGISTRY, get_benchmark
from ktm.errors import Interrupted, KTMError, parser_error
from ktm.io import load_torch, save_torch, write_text
from ktm.model import SETTINGS, LoraSettings, check_settings
from ktm.training.checkpointing import KTMModelCheckpoint, check_monitor
from ktm.training.callbacks import (EpochLog, ReleaseFreedMemory, ResumableRNG, RunOutputs, SaveOnInterrupt, Throughput,
                                   ValidateAtMaxSteps, run_dir)
from ktm.training.data import KTMDataModule, check_data_args
from ktm.training.module import KTMModule, checkpoint_mismatch
from ktm.training.run_folder import (SPECIAL_CKPT, RunFolder, check_claim_options, check_name, eval_checkpoint, refuse_mixing,
                                    reusable, run_path, say_if_made_elsewhere)

log = logging.getLogger("ktm")


def run(argv: list[str]) -> None:
    """Run `ktm <argv>` (argv[0] is fit, validate or test). Raises KTMError for what the user can fix and
    Interrupted after Ctrl-C or SIGTERM (SaveOnInterrupt has then said what it saved)."""
    command = f"ktm {argv[0]}" if argv else "ktm fit"
    claimed: list[RunFolder] = []  # the run folder this command locked (rank zero), released at the end
    interrupt = SaveOnInterrupt()
    try:
        KTMCLI(
            KTMModule,
            KTMDataModule,
            command=command,
            claimed=claimed,
            args=argv,
            seed_everything_default=0,
            parser_class=KTMArgumentParser,
            save_config_callback=KTMSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf", "prog": "ktm"},
            trainer_defaults={
                "callbacks": [BeginRun(claimed), Throughput(), RunOutputs(), interrupt, ResumableRNG(), ValidateAtMaxSteps(),
                              EpochLog(), ReleaseFreedMemory()],
                "num_sanity_val_steps": 0,
                "reload_dataloaders_every_n_epochs": 1,
            },
        )
    except Reused as exc:
        log.info("--reuse: %s holds a finished run of this config; nothing to train (its export: %s)", exc.folder, exc.folder / "export")
        say_if_made_elsewhere(exc.folder)
    except Checked as exc:
        found = "holds a finished run of this config, which --reuse keeps" if exc.reused else "accepts it"
        log.info("--check: %s passes its checks (settings, benchmark options; the run folder %s %s); nothing was loaded",
                 command, exc.folder, found)
    except MisconfigurationException as exc:  # Lightning's own verdict on trainer settings
        raise KTMError(f"invalid trainer setting: {' '.join(str(exc).split())[:240]}",
                       f"fix the trainer section of the config ({command} --help lists the options)") from None
    except SystemExit:
        # Lightning turns Ctrl-C into exit(1) and SIGTERM into a bare SystemExit (0!) after our callback ran
        if interrupt.exit_code is not None:
            raise Interrupted(interrupt.exit_code) from None
        raise
    finally:
        for folder in claimed:
            folder.release()


class Reused(Exception):
    """`ktm fit --reuse` found a finished run of the same config in its folder: nothing to do."""

    def __init__(self, folder: Path):
        super().__init__(str(folder))
        self.folder = folder


class Checked(Exception):
    """`--check` passed every check that needs no model and no data: nothing to run. reused: the folder holds a
    finished run of this config that --reuse would keep."""

    def __init__(self, folder: Path, reused: bool = False):
        super().__init__(str(folder))
        self.folder, self.reused = folder, reused


class KTMArgumentParser(LightningArgumentParser):
    """Parse errors become one `ktm: error:` line instead of a usage dump + SystemExit(2)."""

    command = "ktm fit"  # the command named in the fix; KTMCLI.init_parser sets the one being parsed

    def error(self, message: str, ex: Exception | None = None):
        parser = getattr(ex, "subcommand_parser", None) or self
        raise parser_error(message, parser, self.command)


class KTMCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written atomically with a sha256 sidecar, verified and loaded with
    one-line errors (missing / truncated / corrupt)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        save_torch(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return load_torch(path, "training checkpoint", map_location=map_location or "cpu", weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        Path(str(path) + ".sha256").unlink(missing_ok=True)


class BeginRun(L.Callback):
    """The run starts writing into its folder once every check has passed (training starts; or fit
    ends without a step): with --overwrite the old run is moved aside only then."""

    def __init__(self, claimed: list[RunFolder]):
        self.claimed = claimed  # filled by KTMCLI on rank zero once it has locked the folder

    def _begin(self, trainer) -> None:
        if not (self.claimed and trainer.is_global_zero) or self.claimed[0].begun:
            return
        if self.claimed[0].overwrite:  # TensorBoard's writer opened its file in the old folder at setup: reopen it after the move
            for logger in trainer.loggers:
                writer = getattr(logger, "_experiment", None)
                if writer is not None and hasattr(writer, "close"):
                    writer.close()
                    logger._experiment = None
        self.claimed[0].begin()

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._begin(trainer)


class KTMSaveConfig(SaveConfigCallback):
    """<run>/config.yaml written atomically (with a checksum), on rank zero, once every check has
    passed: fit writes it when training starts (a failed check leaves the run's config as it was);
    validate/test only into a folder without one (a trained run keeps its fit's config)."""

    def setup(self, trainer, pl_module, stage) -> None:
        pass  # not here: the base loads and the data/module checks run after callbacks' setup

    def _save(self, trainer, pl_module, stage) -> None:
        if not self.already_saved and trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
        self.already_saved = True

    def on_train_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "fit")

    def on_fit_end(self, trainer, pl_module) -> None:  # a fit without a training step still leaves its config
        self._save(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._save(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module, "test")

    def save_config(self, trainer, pl_module, stage) -> None:
        path = run_dir(trainer) / "config.yaml"
        if stage == "fit" or not path.exists():
            config = self.config.clone()
            config.ckpt_path = None  # the run's settings, not this command's checkpoint: resume names its own
            write_text(path, self.parser.dump(config, skip_none=False))


class KTMCLI(LightningCLI):
    """LightningCLI with ktm's run-folder options, checks and defaults. `command` ("ktm fit") is named in
    errors; `claimed` receives the RunFolder this command locks (rank zero), for BeginRun and the caller."""

    def __init__(self, *args: Any, command: str, claimed: list[RunFolder], **kwargs: Any):
        self.command = command
        self.claimed = claimed
        super().__init__(*args, **kwargs)  # parses, builds and runs the subcommand

    def init_parser(self, **kwargs: Any):
        # No prefix matching: argparse would read `--model.keep=3` as --model.keep_tail=3 and run
        # with a setting the user never named; a typo must be an error.
        kwargs.setdefault("allow_abbrev", False)
        parser = super().init_parser(**kwargs)
        parser.command = self.command
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", default="ktm", help="experiment name: outputs under <root>/<experiment>/<run>/")
        parser.add_argument("--extends", default=None,
                            help="in an experiment file: the experiment it starts from (ktm/cli.py composes them; recorded only)")
        parser.add_argument("--run", default="default", help="run name inside the experiment folder")
        parser.add_argument("--root", default="checkpoints", help="folder that holds all runs")
        parser.add_argument("--reuse", action="store_true",
                            help="when the run folder holds a finished run of this same config, keep it and exit 0 without "
                                 "training; a finished run of another config is refused with the setting that differs")
        parser.add_argument("--overwrite", action="store_true",
                            help="fit into a run folder that holds a run: move the old run aside to <run>.old-<time> first "
                                 "(nothing is deleted; done when training starts)")
        parser.add_argument("--check", action="store_true",
                            help="check the settings, the benchmark's options and the run folder as this command would, "
                                 "then exit without loading the model or data (make train checks every stage first)")
        # Checkpoints are configurable (experiments/defaults.yaml `checkpoint:`): by default last.ckpt plus
        # the newest epoch file at each epoch's end; checkpoint.every_n_train_steps=N saves every N
        # optimizer steps instead, so a killed run loses fewer than N steps.
        # No "-v1" copies: a run folder holds one run, so a name that exists is this run's own, e.g. last.ckpt of a
        # moved run (its checkpoint names the old folder, and Lightning would version the new last.ckpt beside
        # the stale one that `ktm test` reads).
        parser.add_lightning_class_args(KTMModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.enable_version_counter": False})

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        check_parsed_settings(self.config[sub] if sub else self.config)
        if sub == "fit":
            check_validation_cadence(self.config[sub].trainer)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would read the checkpoint's hyperparameters here and let them override the config,
        # silently: a run branched from a checkpoint with another lr (`--ckpt_path X --model.lr_lora=...`)
        # trained with the old one. Here the config is what runs. A checkpoint must fit it (the model's shape
        # and behaviour, module.CKPT_MUST_MATCH; a damaged or foreign file is refused, naming what differs);
        # every other setting (learning rates, distillation, eval Ks) is the config's.
        sub = self.config.get("subcommand")
        if sub:
            cfg = self.config[sub]
            if sub in ("validate", "test") and not cfg.get("ckpt_path"):
                default_to_last_checkpoint(cfg, self.command)
            if cfg.get("ckpt_path") and cfg.ckpt_path not in SPECIAL_CKPT:
                check_checkpoint_fits(cfg.ckpt_path, cfg.model)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        log_into_run_folder(cfg)
        if cfg.trainer.get("precision") is None:  # null in defaults.yaml: what this machine runs fastest
            from ktm.environment import native_precision

            cfg.trainer.precision = native_precision(cfg.trainer.get("accelerator") or "auto")
        overwrite, cfg.overwrite = bool(cfg.get("overwrite")), False  # a one-off: never saved into config.yaml
        reuse, cfg.reuse = bool(cfg.get("reuse")), False
        check, cfg.check = bool(cfg.get("check")), False
        if reuse and self.subcommand == "fit" and not overwrite:
            self._reuse(cfg, check)
        if check:
            folder = run_path(cfg.root, cfg.experiment, cfg.run)
            if check_claim_options(folder, self.command, cfg.get("ckpt_path"), overwrite):
                refuse_mixing(folder, cfg.get("ckpt_path"))
            raise Checked(folder)
        if rank_zero_only.rank == 0:  # DDP ranks > 0 re-run this command: the folder is rank zero's
            self.claimed.append(RunFolder.claim(cfg.root, cfg.experiment, cfg.run, command=self.command,
                                                ckpt_path=cfg.get("ckpt_path"), overwrite=overwrite))

    def _reuse(self, cfg, check: bool = False) -> None:
        """--reuse: stop here (Reused) when the run folder holds a finished run of this config (run_folder.reusable);
        with --check, say it would be reused (Checked)."""
        import yaml

        parser = self._parser(self.subcommand)
        config = cfg.clone()
        config.ckpt_path = None  # as save_config writes it
        new = yaml.safe_load(parser.dump(config, skip_none=False))
        defaults = yaml.safe_load(parser.dump(parser.get_defaults(), skip_none=False, skip_validation=True))
        folder = run_path(cfg.root, cfg.experiment, cfg.run)
        if reusable(folder, new, defaults):
            raise Checked(folder, reused=True) if check else Reused(folder)

    def instantiate_trainer(self, **kwargs: Any):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if not trainer_cfg.get("plugins"):
            kwargs.setdefault("plugins", [KTMCheckpointIO()])
        return super().instantiate_trainer(**kwargs)


def check_parsed_settings(cfg) -> None:
    """Settings are checked right after parsing, before seeding and before any class is built: a bad
    value fails in a second with one line, not after the base model has been loaded."""
    check_name(cfg.experiment, "--experiment")  # the run folder stays inside --root
    check_name(cfg.run, "--run")
    data = cfg.data.as_dict()
    check_data_args(**data)
    get_benchmark(data["benchmark"], seed=data["seed"], **(data["benchmark_args"] or {}))  # reads no data
    m = cfg.model
    lora = m.lora if isinstance(m.lora, LoraSettings) else LoraSettings(**m.lora.as_dict()) if m.lora is not None else None
    task = getattr(REGISTRY.get(cfg.data.benchmark), "task", None)
    check_monitor(cfg.checkpoint.monitor, cfg.checkpoint.mode, m.ks, m.eval_ks, task)  # the checkpoint group is always parsed
    check_settings(**{name: lora if name == "lora" else m[name] for name in SETTINGS})


def check_validation_cadence(trainer) -> None:
    """The curriculum counts epochs and judges its thresholds at each validation (KTMModule.on_validation_epoch_end),
    and a K schedule entry lasts data.epochs_per_k of them: validating less or more often than once per epoch
    would stretch or squeeze the K schedule without a word, and never validating would stop it."""
    every, interval, limit = (trainer.get(name) for name in ("check_val_every_n_epoch", "val_check_interval", "limit_val_batches"))
    fix = "drop it: the K curriculum moves at each validation, once per epoch (make validation cheaper with data.max_val_examples)"
    for setting, value, off in (("check_val_every_n_epoch", every, every != 1), ("val_check_interval", interval, interval not in (None, 1.0))):
        if off:
            raise KTMError(f"trainer.{setting}={value}: ktm validates once per epoch, and the K schedule would move "
                           "at each validation instead of each epoch", fix)
    if limit == 0:
        raise KTMError("trainer.limit_val_batches=0: without validation the K curriculum never moves", fix)


def default_to_last_checkpoint(cfg, command: str) -> None:
    """`ktm test`/`validate` without --ckpt_path on a trained run evaluate its last.ckpt, and say so: the
    untrained model's numbers never go into a trained run."""
    last = eval_checkpoint(run_path(cfg.root, cfg.experiment, cfg.run), command)
    if last is not None:
        log.info("no --ckpt_path: %s evaluates the run's %s (pass --ckpt_path to pick another)", command, last)
        cfg.ckpt_path = str(last)


def check_checkpoint_fits(ckpt_path: str, model_cfg) -> None:
    """Refuse a damaged file, a checkpoint not written by ktm, or one of another model (module.CKPT_MUST_MATCH)."""
    ckpt = load_torch(ckpt_path, "training checkpoint", weights_only=True)
    if "ktm" not in ckpt:
        raise KTMError(f"training checkpoint {ckpt_path} was not written by ktm (no 'ktm' metadata)",
                       "resume from a checkpoints/<exp>/<run>/checkpoints/*.ckpt file")
    mismatch = checkpoint_mismatch(ckpt.get("hyper_parameters", {}), model_cfg)
    if mismatch:
        key, theirs, ours = mismatch
        raise KTMError(f"the checkpoint's model.{key} is {theirs}, but the config asks for {ours} ({ckpt_path})",
                       "resume with the run's own config (ktm fit --config <run>/config.yaml --ckpt_path ...), "
                       "or drop --ckpt_path to start a new run")


def log_into_run_folder(cfg) -> None:
    """TensorBoard and the trainer write into <root>/<experiment>/<run>/. A run's config.yaml stores the
    logger with the folder it was written for: --root, --experiment and --run given with
    `--config <run>/config.yaml` must still decide."""
    if not cfg.trainer.get("logger") or cfg.trainer.logger is True:
        cfg.trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=cfg.root, name=cfg.experiment, version=cfg.run, default_hp_metric=False))
    else:
        for logger in cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]:
            if str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger") and logger.get("init_args") is not None:
                logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = cfg.root, cfg.experiment, cfg.run
    cfg.trainer.default_root_dir = str(Path(cfg.root) / cfg.experiment / cfg.run)
