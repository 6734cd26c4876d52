"""The `ktm` command.

    ktm fit --exp tree_k4 [--trainer.max_epochs=3 --model.ks=[1,4] ...]   train (LightningCLI)
    ktm validate|test --config checkpoints/<exp>/<run>/config.yaml --ckpt_path .../last.ckpt
    ktm generate --ckpt checkpoints/<exp>/<run>/export "prompt" [...]
    ktm data build --benchmark tree --stage small | ktm data commits --repo PATH --out FILE
    ktm bench [...]                                                          speed benchmark
    ktm report checkpoints/<exp>/<run> [...]                                 markdown table of a run's metrics
    ktm experiments                                                          list the configs

`--exp NAME` composes experiments/defaults.yaml with experiments/NAME.yaml; outputs of a run go to
checkpoints/<experiment>/<run>/ (TensorBoard events, config.yaml, checkpoints/, export/, metrics.json).
Problems the user can fix print one line `ktm: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

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


def run_lightning(argv: list[str]) -> None:
    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from ktm.training.callbacks import RunOutputs, SaveOnInterrupt, Throughput
    from ktm.training.data import KTMDataModule
    from ktm.training.module import KTMModule

    class KTMCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--experiment", default="ktm", help="experiment name: outputs under <root>/<experiment>/<run>/")
            parser.add_argument("--run", default="default", help="run name inside the experiment folder")
            parser.add_argument("--root", default="checkpoints", help="folder that holds all runs")

        def before_instantiate_classes(self) -> None:
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            if not cfg.trainer.get("logger") or cfg.trainer.logger is True:
                cfg.trainer.logger = Namespace(
                    class_path="lightning.pytorch.loggers.TensorBoardLogger",
                    init_args=Namespace(save_dir=cfg.root, name=cfg.experiment, version=cfg.run, default_hp_metric=False))
            cfg.trainer.default_root_dir = str(Path(cfg.root) / cfg.experiment / cfg.run)

    KTMCLI(
        KTMModule,
        KTMDataModule,
        args=argv,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        trainer_defaults={
            "callbacks": [
                ModelCheckpoint(save_last=True, save_top_k=0, every_n_train_steps=None),
                Throughput(), RunOutputs(), SaveOnInterrupt(),
            ],
            "num_sanity_val_steps": 0,
            "reload_dataloaders_every_n_epochs": 1,
        },
    )


def cmd_generate(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="ktm generate", description="Answer prompts with a trained ktm model.")
    p.add_argument("--ckpt", required=True, help="export folder of a run (checkpoints/<exp>/<run>/export)")
    p.add_argument("--k", type=int, default=None, help="K to merge with (default: the largest K the model has)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="override the base model location (same weights required)")
    p.add_argument("prompts", nargs="+", help="prompt text(s); '-' reads one prompt from stdin")
    a = p.parse_args(argv)
    prompts = [sys.stdin.read() if x == "-" else x for x in a.prompts]
    from ktm.model import KTMModel

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
    p = argparse.ArgumentParser(prog="ktm data", description="Build and cache benchmark data.")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not log.handlers:  # our own handler only: Lightning configures its loggers itself
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ktm: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
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
        elif cmd == "report":
            from ktm.report import main as report_main

            report_main(rest)
        elif cmd == "experiments":
            print("\n".join(available_experiments()))
        else:
            raise KTMError(f"unknown command {cmd!r}", "use one of: fit, validate, test, generate, data, bench, report, experiments")
    except KTMError as exc:
        print(f"ktm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ktm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
