"""The `ktm` command.

    ktm fit --exp tree_k4 [--trainer.max_epochs=3 --model.ks=[1,4] ...]   train (LightningCLI)
    ktm validate|test --config checkpoints/<exp>/<run>/config.yaml --ckpt_path .../last.ckpt
    ktm generate --ckpt checkpoints/<exp>/<run>/export "prompt" [...]
    ktm data build --benchmark tree --stage small | ktm data commits --repo PATH --out FILE
    ktm bench [...]                                                          speed benchmark
    ktm report checkpoints/<exp>/<run> [...]                                 markdown table of a run's metrics
    ktm compare --exp tree_k4 [--compressors merge none ...] [--ks 4] [ARGS]   merge vs baselines, one run per cell
    ktm eval --ckpt <run>/export --data PATH [--ks 2 4] [--max-drift 0.08]   perplexity drift on your texts (exit 1 above)
    ktm experiments                                                          list the configs

`--exp NAME` composes experiments/defaults.yaml with experiments/NAME.yaml; outputs of a run go to
checkpoints/<experiment>/<run>/ (TensorBoard events, config.yaml, checkpoints/, export/, metrics.json).
Problems the user can fix print one line `ktm: error: <problem> -> <fix>` and exit 2; Ctrl-C (SIGTERM)
during training saves checkpoints/interrupted.ckpt, prints the resume command and exits 130 (143).
Resume any run:  ktm fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
A run folder holds one run (ktm/training/run_folder.py): `ktm fit` into one that holds a run is refused
unless it resumes it (--ckpt_path) or --overwrite moves the old one aside to <run>.old-<time>.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from ktm.errors import KTMError

log = logging.getLogger("ktm")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = Path(os.environ.get("KTM_EXPERIMENTS", REPO_ROOT / "experiments"))
TRAINER_SUBCOMMANDS = ("fit", "validate", "test")


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "defaults")


def expand_exp(argv: list[str]) -> list[str]:
    """Replace `--exp NAME` by the composed config files (+ the experiment name for the run folder)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--exp" or arg.startswith("--exp="):
            name = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if name not in available_experiments():
                raise KTMError(f"unknown experiment {name!r}", f"use one of: {', '.join(available_experiments())}")
            out += ["--config", str(EXPERIMENTS / "defaults.yaml"), "--config", str(EXPERIMENTS / f"{name}.yaml"), "--experiment", name]
            continue
        out.append(arg)
        i += 1
    return out


class Interrupted(Exception):
    """Stopped by Ctrl-C (exit 130) or SIGTERM (143); SaveOnInterrupt already said what it saved."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _known_keys(parser) -> list[str]:
    """Every option of a (jsonargparse) parser, nested groups included, without the leading dashes."""
    keys = []
    for action in getattr(parser, "_actions", []):
        for opt in getattr(action, "option_strings", []):
            if opt.startswith("--"):
                keys.append(opt[2:])
    return keys


def _suggest(name: str, parser) -> str:
    """`did you mean --model.ks? ` for a misspelt key: first among keys of the same section."""
    known = _known_keys(parser) if parser is not None else []
    section, _, leaf = name.rpartition(".")
    same = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section}
    prefixed = sorted((k for k in same if k.startswith(leaf)), key=len) if leaf else []
    close = prefixed[:1] or difflib.get_close_matches(leaf, list(same), n=1, cutoff=0.75)
    if close:
        return f"did you mean --{same[close[0]]}? "
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8)
    return f"did you mean --{close[0]}? " if close else ""


_TYPE_WORDS = {"int": "a whole number", "float": "a number", "list": "a list like [1, 2]", "dict": "a mapping like {key: value}",
               "bool": "true or false", "str": "text", "NoneType": "null"}


def _expected_types(text: str) -> list[str]:
    out: list[str] = []
    literals: list[str] = []
    for raw in re.findall(r"Expected an? (.+?)(?:\. Got value:.*)?$", text, re.M):
        t = re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", raw.strip().rstrip("."))
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", t)
        if literal:  # several Literal alternatives (trainer.precision) read best as one list
            literals += [v for v in (x.strip() for x in literal.group(1).split(",")) if v not in literals]
            continue
        t = _TYPE_WORDS.get(t, t)
        if t not in out:
            out.append(t)
    return ([f"one of {', '.join(literals)}"] if literals else []) + out


def parser_error(message: str, parser=None, command: str = "ktm fit") -> KTMError:
    """Turn a jsonargparse/argparse error (several lines, after a usage dump) into one KTMError line."""
    text = str(message).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else "invalid arguments"
    help_hint = f"`{command} --help` lists every option"
    m = re.match(r"unrecognized arguments: (.+)", first)
    if m:
        unknown = m.group(1).strip()
        names = re.findall(r"--([\w.\-]+)", unknown) or [unknown.split()[0].lstrip("-")]
        return KTMError(f"unknown option {unknown}", f"{_suggest(names[0], parser)}check the spelling; {help_hint}")
    m = re.search(r"does not accept option '([^']+)'", first) or re.search(r'No action for key "([^"]+)"', text)
    if m:  # an unknown key inside a config file
        return KTMError(f"unknown option {m.group(1)} (in a config file)", f"{_suggest(m.group(1), parser)}fix or remove it; {help_hint}")
    m = re.match(r'Parser key "([^"]+)":?\s*(.*)', first)
    if m:
        key, rest = m.group(1), m.group(2)
        if key == "config":
            return KTMError(f"config file problem: {rest or ' '.join(lines[1:])}", "check the path given to --config / --exp")
        given = re.search(r"(?:Given value|Got value):\s*(.*)", text)
        if given is not None:
            want = " or ".join(_expected_types(text)) or "a valid value"
            fix = f"set {key} to {want}" if len(want) <= 60 else f"set {key} to one of the values above"
            return KTMError(f"bad value for {key}: {given.group(1).strip()!r} is not {want}", f"{fix} ({help_hint})")
        detail = "; ".join([rest, *lines[1:]]).strip("; ")
        return KTMError(f"bad value for {key}: {detail[:200]}", f"fix {key} in the config or command line ({help_hint})")
    if first.startswith("Problems parsing config"):
        return KTMError(f"cannot parse the config: {' '.join(lines)[:220]}", "fix the YAML syntax of that file or value")
    return KTMError(" ".join(lines)[:300], f"fix the command line or config ({help_hint})")


def _check_config_files(argv: list[str]) -> None:
    """A config.yaml written by ktm carries a checksum: say so when it was changed since (edits are
    allowed, so this warns; a truncated copy would otherwise silently fall back to defaults)."""
    from ktm.io import recorded_sha256, sha256_file

    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path and Path(path).is_file() and (expected := recorded_sha256(path)) and sha256_file(path) != expected:
            log.warning("%s was changed after ktm wrote it (checksum differs): using it as it is now", path)


# Model settings that shape the trained weights: a checkpoint only fits a run with the same ones.
CKPT_HPARAMS = ("base", "ks", "keep_tail", "encoder_multiplier", "encoder_bound", "compressor", "lora")


def _lora_shape(lora: Any) -> Any:
    if lora is None:
        return None
    d = lora if isinstance(lora, dict) else (lora.as_dict() if hasattr(lora, "as_dict") else vars(lora))
    return {k: d.get(k) for k in ("r", "target_modules")}  # alpha/dropout do not change the weights' shapes


def run_lightning(argv: list[str]) -> None:
    import lightning as L
    from jsonargparse import Namespace
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from ktm.io import load_torch, save_torch, write_text
    from ktm.model import LoraSettings, check_settings
    from ktm.training.callbacks import EpochLog, ResumableRNG, RunOutputs, SaveOnInterrupt, Throughput, run_dir
    from ktm.training.data import KTMDataModule, check_data_args
    from ktm.training.module import KTMModule
    from ktm.training.run_folder import RunFolder, check_name, eval_checkpoint, run_path

    command = f"ktm {argv[0]}" if argv else "ktm fit"
    claimed: list[RunFolder] = []  # the run folder this command locked (rank zero), released at the end

    class KTMArgumentParser(LightningArgumentParser):
        """Parse errors become one `ktm: error:` line instead of a usage dump + SystemExit(2)."""

        def error(self, message: str, ex: Exception | None = None):
            parser = getattr(ex, "subcommand_parser", None) or self
            raise parser_error(message, parser, command)

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

        def _begin(self, trainer) -> None:
            if not (claimed and trainer.is_global_zero) or claimed[0].begun:
                return
            if claimed[0].overwrite:  # TensorBoard's writer opened its file in the old folder at setup: reopen it after the move
                for logger in trainer.loggers:
                    writer = getattr(logger, "_experiment", None)
                    if writer is not None and hasattr(writer, "close"):
                        writer.close()
                        logger._experiment = None
            claimed[0].begin()

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

    class KTMModelCheckpoint(ModelCheckpoint):
        """Lightning's ModelCheckpoint, plus: last.ckpt always holds the final state once training ends.
        (With every_n_train_steps, Lightning keeps the last *periodic* save as last.ckpt, so `ktm test
        --ckpt_path .../last.ckpt` would evaluate a model older than the exported one.)"""

        def on_train_end(self, trainer, pl_module) -> None:
            super().on_train_end(trainer, pl_module)
            if self.save_last and self._last_global_step_saved != trainer.global_step:
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    class KTMCLI(LightningCLI):
        def init_parser(self, **kwargs: Any):
            # No prefix matching: argparse would read `--model.keep=3` as --model.keep_tail=3 and run
            # with a setting the user never named; a typo must be an error.
            kwargs.setdefault("allow_abbrev", False)
            return super().init_parser(**kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--experiment", default="ktm", help="experiment name: outputs under <root>/<experiment>/<run>/")
            parser.add_argument("--run", default="default", help="run name inside the experiment folder")
            parser.add_argument("--root", default="checkpoints", help="folder that holds all runs")
            parser.add_argument("--overwrite", action="store_true",
                                help="fit into a run folder that holds a run: move the old run aside to <run>.old-<time> first "
                                     "(nothing is deleted; done when training starts)")
            # Checkpoints are configurable (experiments/defaults.yaml `checkpoint:`): by default last.ckpt plus
            # the newest epoch file at each epoch's end; checkpoint.every_n_train_steps=N saves every N
            # optimizer steps instead, so a killed run loses fewer than N steps.
            parser.add_lightning_class_args(KTMModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 1})

        def _parse_ckpt_path(self) -> None:
            # LightningCLI reads the checkpoint's hyperparameters here (torch.load, weights_only) and
            # silently lets them override the config: refuse a damaged file or a checkpoint of another
            # model first, naming what differs.
            sub = self.config.get("subcommand")
            ckpt_path = self.config[sub].get("ckpt_path") if sub else None
            if sub in ("validate", "test") and not ckpt_path:
                # Never the untrained model's numbers into a trained run: its last.ckpt, and say so.
                cfg = self.config[sub]
                last = eval_checkpoint(run_path(cfg.root, cfg.experiment, cfg.run), command)
                if last is not None:
                    log.info("no --ckpt_path: %s evaluates the run's %s (pass --ckpt_path to pick another)", command, last)
                    cfg.ckpt_path = ckpt_path = str(last)
            if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
                ckpt = load_torch(ckpt_path, "training checkpoint", weights_only=True)
                if "ktm" not in ckpt:
                    raise KTMError(f"training checkpoint {ckpt_path} was not written by ktm (no 'ktm' metadata)",
                                   "resume from a checkpoints/<exp>/<run>/checkpoints/*.ckpt file")
                saved, mine = ckpt.get("hyper_parameters", {}), self.config[sub].model
                for key in CKPT_HPARAMS:
                    a, b = saved.get(key), mine.get(key)
                    if key == "lora":
                        a, b = _lora_shape(a), _lora_shape(b)
                    elif key == "ks" and a is not None and b is not None:
                        a, b = sorted(set(a)), sorted(set(b))
                    if key in saved and a != b:
                        raise KTMError(f"the checkpoint's model.{key} is {a}, but the config asks for {b} ({ckpt_path})",
                                       "resume with the run's own config (ktm fit --config <run>/config.yaml --ckpt_path ...), "
                                       "or drop --ckpt_path to start a new run")
            super()._parse_ckpt_path()

        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            # Settings are checked right after parsing, before seeding and before any class is built:
            # a bad value fails in a second with one line, not after the base model has been loaded.
            sub = self.config.get("subcommand")
            cfg = self.config[sub] if sub else self.config
            check_name(cfg.experiment, "--experiment")  # the run folder stays inside --root
            check_name(cfg.run, "--run")
            check_data_args(**cfg.data.as_dict())
            m = cfg.model
            lora = m.lora if isinstance(m.lora, LoraSettings) else LoraSettings(**m.lora.as_dict()) if m.lora is not None else None
            check_settings(m.ks, m.keep_tail, m.encoder_multiplier, m.max_prompt_tokens, m.long_prompt_policy, lora, m.encoder_bound, m.compressor)

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if not cfg.trainer.get("logger") or cfg.trainer.logger is True:
                cfg.trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=cfg.root, name=cfg.experiment, version=cfg.run, default_hp_metric=False))
            else:
                # A run's config.yaml stores the logger with the folder it was written for: --root,
                # --experiment and --run given with `--config <run>/config.yaml` must still decide.
                for logger in cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]:
                    if str(getattr(logger, "class_path", "")).endswith("TensorBoardLogger") and logger.get("init_args") is not None:
                        logger.init_args.save_dir, logger.init_args.name, logger.init_args.version = cfg.root, cfg.experiment, cfg.run
            cfg.trainer.default_root_dir = str(Path(cfg.root) / cfg.experiment / cfg.run)
            if cfg.trainer.get("precision") is None:  # null in defaults.yaml: what this machine runs fastest
                from ktm.environment import native_precision

                cfg.trainer.precision = native_precision(cfg.trainer.get("accelerator") or "auto")
            overwrite, cfg.overwrite = bool(cfg.get("overwrite")), False  # a one-off: never saved into config.yaml
            if rank_zero_only.rank == 0:  # DDP ranks > 0 re-run this command: the folder is rank zero's
                claimed.append(RunFolder.claim(cfg.root, cfg.experiment, cfg.run, command=command,
                                               ckpt_path=cfg.get("ckpt_path"), overwrite=overwrite))

        def instantiate_trainer(self, **kwargs: Any):
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if not trainer_cfg.get("plugins"):
                kwargs.setdefault("plugins", [KTMCheckpointIO()])
            return super().instantiate_trainer(**kwargs)

    _check_config_files(argv)
    interrupt = SaveOnInterrupt()
    try:
        KTMCLI(
            KTMModule,
            KTMDataModule,
            args=argv,
            seed_everything_default=0,
            parser_class=KTMArgumentParser,
            save_config_callback=KTMSaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            parser_kwargs={"parser_mode": "omegaconf", "prog": "ktm"},
            trainer_defaults={
                "callbacks": [BeginRun(), Throughput(), RunOutputs(), interrupt, ResumableRNG(), EpochLog()],
                "num_sanity_val_steps": 0,
                "reload_dataloaders_every_n_epochs": 1,
            },
        )
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


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `ktm: error:` line (not a usage dump); --help still works."""

    def error(self, message: str):
        raise parser_error(message, self, self.prog)


def cmd_generate(argv: list[str]) -> None:
    p = OneLineParser(prog="ktm generate", description="Answer prompts with a trained ktm model.")
    p.add_argument("--ckpt", required=True, help="export folder of a run (checkpoints/<exp>/<run>/export)")
    p.add_argument("--k", type=int, default=None, help="K to merge with (default: the largest K the model has)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="override the base model location (same weights required)")
    p.add_argument("prompts", nargs="+", help="prompt text(s); '-' reads one prompt from stdin")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        raise KTMError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}", "pass e.g. --max-new-tokens 32")
    if not a.temperature >= 0:
        raise KTMError(f"--temperature must be >= 0, got {a.temperature}", "pass 0 for greedy or e.g. 0.7")
    if not 0 < a.top_p <= 1:
        raise KTMError(f"--top-p must be in (0, 1], got {a.top_p}", "pass e.g. 0.9, or 1 to disable")
    prompts = [sys.stdin.read() if x == "-" else x for x in a.prompts]
    from ktm.model import KTMModel, check_k

    if a.k is not None:
        check_k(a.k)
    model = KTMModel.from_pretrained(a.ckpt, base=a.base)
    k = a.k if a.k is not None else model.ks[-1]
    for prompt, answer in zip(prompts, model.generate(prompts, k=k, max_new_tokens=a.max_new_tokens,
                                                      temperature=a.temperature, top_p=a.top_p, seed=a.seed)):
        print(answer)


def cmd_data(argv: list[str]) -> None:
    if argv and argv[0] == "commits":
        from ktm.benchmarks.commitpack import main as mine_main

        mine_main(argv[1:])
        return
    p = OneLineParser(prog="ktm data", description="Build and cache benchmark data.")
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="build (or reuse) the cached splits of a benchmark stage")
    b.add_argument("--benchmark", default="tree")
    b.add_argument("--stage", default=None)
    b.add_argument("--seed", type=int, default=0)
    sub.add_parser("commits", help="mine (old, subject, new) triples from a local git repo (see ktm data commits -h)")
    a = p.parse_args(argv)
    from ktm.benchmarks import get_benchmark
    from ktm.benchmarks.common import label_counts

    bench = get_benchmark(a.benchmark, seed=a.seed)
    for stage in [a.stage] if a.stage else bench.stages:
        s = bench.load(stage)
        print(f"{a.benchmark}/{stage}: train {len(s.train)} val {len(s.val)} test {len(s.test)} "
              f"labels(test) {label_counts(s.test)} -> {bench.cache_path(stage)}")


def cmd_bench(argv: list[str]) -> None:
    from ktm.bench import main as bench_main

    bench_main(argv)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the message: main() may run several times in
    one process (tests, notebooks) with stderr swapped in between, and a handler holding the first
    one would write to a closed stream."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not log.handlers:  # our own handler only: Lightning configures its loggers itself
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("ktm: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # We hand LightningCLI a rewritten argv (--exp expanded) on purpose; its "args and sys.argv both
    # given" warning would only add noise above one-line errors.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # Lightning's "Checkpoint directory ... exists and is not empty": a fit there is a resume or --overwrite
    # (ktm/training/run_folder.py refuses any other), so the warning would only ever be noise.
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(__doc__)
            return 0
        cmd, rest = argv[0], argv[1:]
        if cmd in TRAINER_SUBCOMMANDS:
            run_lightning([cmd, *expand_exp(rest)])
        elif cmd == "generate":
            cmd_generate(rest)
        elif cmd == "data":
            cmd_data(rest)
        elif cmd == "bench":
            cmd_bench(rest)
        elif cmd == "compare":
            from ktm.compare import main as compare_main

            compare_main(rest)
        elif cmd == "report":
            from ktm.report import main as report_main

            report_main(rest)
        elif cmd == "eval":
            from ktm.drift import main as eval_main

            return eval_main(rest)
        elif cmd == "experiments":
            print("\n".join(available_experiments()))
        else:
            raise KTMError(f"unknown command {cmd!r}", "use one of: fit, validate, test, generate, eval, data, bench, report, compare, experiments")
    except KTMError as exc:
        print(f"ktm: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # SaveOnInterrupt already printed where it saved and how to resume
        return exc.code
    except KeyboardInterrupt:
        print("ktm: interrupted (no training checkpoint was written by this command)", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help (0); anything else keeps its code
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
