"""The `ktm` command.

    ktm fit --exp tree_k4 [--trainer.max_epochs=3 --model.ks=[1,4] ...]   train (LightningCLI)
    ktm validate|test --config checkpoints/<exp>/<run>/config.yaml --ckpt_path .../last.ckpt
    ktm generate --ckpt checkpoints/<exp>/<run>/export "prompt" [...]
    ktm data build --benchmark tree --stage small | ktm data commits --repo PATH --out FILE
    ktm bench [...]                                                          speed benchmark
    ktm report checkpoints/<exp>/<run> [...]                                 markdown table of a run's metrics
    ktm curves checkpoints/<exp>/<run> [...] [--metric perplexity] [--ks 4]   a val metric vs step per K (PNG + JSON)
    ktm compare --exp tree_k4 [--compressors merge none ...] [--ks 4] [ARGS]   merge vs baselines, one run per cell
    ktm eval --ckpt <run>/export --data PATH [--ks 2 4] [--max-drift 0.08]   perplexity drift on your texts (exit 1 above)
    ktm experiments                                                          list the configs (and what each extends)

`--exp NAME` composes experiments/defaults.yaml with experiments/NAME.yaml (after the experiments it `extends:`); outputs of a run go to
checkpoints/<experiment>/<run>/ (TensorBoard events, config.yaml, checkpoints/, export/, metrics.json).
Problems the user can fix print one line `ktm: error: <problem> -> <fix>` and exit 2; Ctrl-C (SIGTERM)
during training saves checkpoints/interrupted.ckpt, prints the resume command and exits 130 (143).
Resume any run:  ktm fit --config <run>/config.yaml --ckpt_path <run>/checkpoints/last.ckpt
A run folder holds one run (ktm/training/run_folder.py): `ktm fit` into one that holds a run is refused
unless it resumes it (--ckpt_path) or --overwrite moves the old one aside to <run>.old-<time>.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from functools import reduce
from pathlib import Path

from ktm.errors import Interrupted, KTMError, OneLineParser

log = logging.getLogger("ktm")

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = Path(os.environ.get("KTM_EXPERIMENTS", REPO_ROOT / "experiments"))
TRAINER_SUBCOMMANDS = ("fit", "validate", "test")


def available_experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if p.stem != "defaults")


def experiment_files(name: str) -> list[Path]:
    """experiments/NAME.yaml after the experiments it `extends:` (a chain, the root first): LightningCLI reads them
    in this order after defaults.yaml, each overriding the ones before as repeated --config files do."""
    known, files = available_experiments(), []
    child = None
    while name is not None:
        if name not in known:
            problem = f"experiments/{child}.yaml extends {name!r}, which does not exist" if child else f"unknown experiment {name!r}"
            raise KTMError(problem, f"use one of: {', '.join(known)}")
        path = EXPERIMENTS / f"{name}.yaml"
        if path in files:
            chain = " -> ".join(p.stem for p in [*reversed(files), path])
            raise KTMError(f"experiments extend each other in a circle: {chain}", "remove `extends:` from one of them")
        files.insert(0, path)
        child, name = name, _extends(path)
    return files


def experiments_table() -> str:
    """`ktm experiments`: one line per experiment, with the one it extends."""
    names = available_experiments()
    width = max(map(len, names), default=0)
    return "\n".join(f"{n:<{width}}  extends {p}" if (p := _extends(EXPERIMENTS / f"{n}.yaml")) else n for n in names)


def read_experiment(path: Path) -> dict:
    """One experiment YAML as a dict ({} when empty or not a mapping), or one line when it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KTMError(f"cannot read {path} ({' '.join(str(exc).split())[:120]})", "fix the YAML (ktm fit --exp NAME --print_config shows the result)") from None
    return config if isinstance(config, dict) else {}


def _extends(path: Path) -> str | None:
    """The `extends:` entry of an experiment file (None without one)."""
    parent = read_experiment(path).get("extends")
    if parent is not None and not isinstance(parent, str):
        raise KTMError(f"`extends:` in {path} must be one experiment name, got {parent!r}", "write e.g. extends: read_amazon_k4")
    return parent


def deep_merge(base, over):
    """`over` on top of `base`: two mappings merge key by key, recursively; any other value (null included) replaces."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{key: deep_merge(base[key], value) if key in base else value for key, value in over.items()}}


def config_files(name: str) -> list[Path]:
    """What `--exp NAME` reads, in order: defaults.yaml, then the experiment chain (root first)."""
    return [EXPERIMENTS / "defaults.yaml", *experiment_files(name)]


def composed_experiment(name: str) -> dict:
    """What `--exp NAME` gives before command-line options: its config files, deep-merged."""
    return reduce(deep_merge, map(read_experiment, config_files(name)), {})


def merged_mapping_args(files: list[Path]) -> list[str]:
    """`--section.option=VALUE` for each mapping option (data.benchmark_args, a per-K lr) that a later file changes
    in part: repeated --config files replace a mapping option whole, so it follows them deep-merged, and a child
    names only the keys that differ (null drops its parent's mapping)."""
    import yaml

    sections = [{key: value for key, value in read_experiment(path).items() if isinstance(value, dict)} for path in files]
    args = []
    for section, options in reduce(deep_merge, sections, {}).items():
        for option, value in options.items():
            last = next(doc[section][option] for doc in reversed(sections) if option in doc.get(section, {}))
            if value != last:
                args.append(f"--{section}.{option}={yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 20).strip()}")
    return args


def expand_exp(argv: list[str]) -> list[str]:
    """Replace `--exp NAME` by the composed config files, their merged mapping options and the experiment name
    (for the run folder)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--exp" or arg.startswith("--exp="):
            name = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            files = config_files(name)
            out += [a for f in files for a in ("--config", str(f))] + merged_mapping_args(files) + ["--experiment", name]
            continue
        out.append(arg)
        i += 1
    return out


def _check_config_files(argv: list[str]) -> None:
    """A config.yaml written by ktm carries a checksum: say so when it was changed since (edits are
    allowed, so this warns; a truncated copy would otherwise silently fall back to defaults)."""
    from ktm.io import recorded_sha256, sha256_file

    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if path and Path(path).is_file() and (expected := recorded_sha256(path)) and sha256_file(path) != expected:
            log.warning("%s was changed after ktm wrote it (checksum differs): using it as it is now", path)


def run_lightning(argv: list[str]) -> None:
    """`ktm fit|validate|test` (LightningCLI, ktm/training/lightning_cli.py; imported here, Lightning is slow to import)."""
    from ktm.training.lightning_cli import run

    _check_config_files(argv)
    run(argv)


def cmd_generate(argv: list[str]) -> None:
    p = OneLineParser(prog="ktm generate", description="Answer prompts with a trained ktm model.")
    p.add_argument("--ckpt", required=True, help="export folder of a run (checkpoints/<exp>/<run>/export)")
    p.add_argument("--k", type=int, default=None, help="K to merge with (default: the largest K the model has)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=None, help="override the base model location (same weights required)")
    p.add_argument("--keep", default=None, metavar="TEXT",
                   help="text that follows each prompt and stays in tokens, not merged (e.g. the question, for a model "
                        "trained with model.keep_marked)")
    p.add_argument("prompts", nargs="+", help="prompt text(s); '-' reads one prompt from stdin")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        raise KTMError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}", "pass e.g. --max-new-tokens 32")
    if not a.temperature >= 0:
        raise KTMError(f"--temperature must be >= 0, got {a.temperature}", "pass 0 for greedy or e.g. 0.7")
    if not 0 < a.top_p <= 1:
        raise KTMError(f"--top-p must be in (0, 1], got {a.top_p}", "pass e.g. 0.9, or 1 to disable")
    prompts = [sys.stdin.read() if x == "-" else x for x in a.prompts]
    if a.keep:
        prompts = [(x, a.keep) for x in prompts]
    from ktm.model import KTMModel, check_k

    if a.k is not None:
        check_k(a.k)
    model = KTMModel.from_pretrained(a.ckpt, base=a.base)
    k = a.k if a.k is not None else model.ks[-1]
    for answer in model.generate(prompts, k=k, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                 seed=a.seed):
        print(answer)


def cmd_data(argv: list[str]) -> None:
    if argv and argv[0] == "commits":
        from ktm.benchmarks.commit_miner import main as mine_main

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
    # "Found N module(s) in eval mode at the start of training": those are the frozen base's own modules,
    # left in eval mode by from_pretrained (a frozen model needs no dropout); the LoRA and encoder modules
    # train. It fires on every fit, so it would only ever be noise.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # "Precision bf16-mixed is not supported by the model summary": only the summary's size estimate in MB
    # is affected, and every fit on a bf16 CPU (the default there) would print it.
    warnings.filterwarnings("ignore", message=r".*is not supported by the model summary.*")
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
        elif cmd == "curves":
            from ktm.curves import main as curves_main

            curves_main(rest)
        elif cmd == "eval":
            from ktm.drift import main as eval_main

            return eval_main(rest)
        elif cmd == "experiments":
            print(experiments_table())
        else:
            raise KTMError(f"unknown command {cmd!r}", "use one of: fit, validate, test, generate, eval, data, bench, report, curves, compare, experiments")
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
