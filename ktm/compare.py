"""`ktm compare`: the merge against every baseline compressor at the same compression, one run per cell.

    ktm compare --exp tree_k4 [--compressors merge truncate_tail ...] [--ks 4] [--baseline-schedule k|curriculum]
                [--extra RUN ...] [--root checkpoints] [--dry-run] [ARGS]

One job: plan the (compressor, K) cells, run them, aggregate. Each cell is a normal run folder
`<root>/<exp>/cmp_<compressor>_k<K>`, trained and tested through the Lightning CLI as subprocesses
(`ktm fit --exp EXP --run cmp_... --model.compressor=C --model.ks=[..] --data.k_schedule=[..] ARGS`, then
`ktm test`), so every cell trains the same way: same experiment, data, trainer budget and seed.

- K=1 is the `none` cell (every compressor reads the whole prompt at K=1): the uncompressed reference.
- The merge keeps the experiment's K curriculum up to K (e.g. [1, 2, 4] at K=4, [1, 2] at K=2). A
  baseline trains at its K alone (`data.k_schedule=[K]`, `--baseline-schedule k`, the default), or on the
  merge's curriculum (`--baseline-schedule curriculum`: the same K=1 warm-up and intermediate Ks, each read
  through the baseline, so every cell spends the same steps at each K). Such cells are
  `cmp_<compressor>_k<K>_curriculum` and report to `compare/<exp>_curriculum/`; `none` and `merge` cells
  are the same under both rules and are shared. Every cell has K=1 in model.ks, so perplexity
  tasks get P = ppl(K=1) / ppl within the run, as ktm does for the merge (ktm.metrics).
- A cell's folder decides what runs (`plan_cell`): test results at K there = reused; a finished fit
  without them = `ktm test` only; a checkpoint without a finished fit = resumed from the newest of
  last.ckpt / interrupted.ckpt with the run's own config.yaml, never restarted. Anything else is refused
  before any cell runs. ARGS (any `ktm fit` option) go to fresh fits only: a resumed run keeps its config.
- `--extra RUN ...`: finished runs of the same experiment (with test results at a compared K) added as
  extra rows, labelled `<compressor> (<RUN>)`, e.g. a merge started from a reading checkpoint
  (`--model.init_from`) or trained with another policy. compare never trains or changes them; an extra
  merge gets its own gain row against the same baselines.
- Outputs: `<root>/compare/<exp>/results.json`, `results.md` (test split: every accuracy beside balanced
  accuracy and the majority baseline, P-L F1, merge's relative P-L F1 gain over the strongest baseline
  at each K) and `pareto.png` (quality vs compression L, one line per method over K; P-L F1 per method).

Several GPUs: no scheduler of our own. Run one `ktm compare` per device on a subset of the compressors,
e.g. `CUDA_VISIBLE_DEVICES=0 ktm compare --exp X --compressors merge none &`,
`CUDA_VISIBLE_DEVICES=1 ktm compare --exp X --compressors truncate_tail truncate_head &` ..., then
`ktm compare --exp X` once more: it reuses every finished cell and writes the report of all of them.
(Each folder's lock refuses a cell that another process is running.)
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ktm.errors import Interrupted, KTMError, OneLineParser
from ktm.io import read_json, write_json, write_text, write_with
from ktm.report import CLASSIFICATION_COLUMNS, PERPLEXITY_COLUMNS, _fmt, task_of


COLUMNS = {"classification": CLASSIFICATION_COLUMNS, "perplexity": PERPLEXITY_COLUMNS}
PREFIX = "cmp_"
# What compare sets per cell: given in ARGS they would make the cells differ in more than their method.
RESERVED = {"--run": "compare names each cell's run folder (cmp_<compressor>_k<K>)", "--experiment": "use --exp",
            "--config": "use --exp", "--ckpt_path": "compare resumes a half-finished cell by itself",
            "--overwrite": "to rerun a cell, move its folder away first", "--model.compressor": "use --compressors",
            "--model.ks": "use --ks", "--data.k_schedule": "use --ks (the merge keeps the experiment's curriculum up to K)"}


BASELINE_SCHEDULES = ("k", "curriculum")


@dataclass(frozen=True)
class Cell:
    compressor: str
    k: int
    schedule: str = "k"  # a baseline's: "k" (its K alone) or "curriculum" (the merge's); see the module docstring

    @property
    def follows_curriculum(self) -> bool:
        return self.compressor == "merge" or (self.schedule == "curriculum" and self.compressor != "none")

    @property
    def run(self) -> str:
        own = self.follows_curriculum and self.compressor != "merge"  # a baseline on the curriculum: its own folder
        return f"{PREFIX}{self.compressor}_k{self.k}" + ("_curriculum" if own else "")


@dataclass
class Step:
    """What one cell needs: `state` (fit, resume, test, reuse), why, and the command lines (without `ktm`)."""

    cell: Cell
    state: str
    why: str
    commands: list[list[str]] = field(default_factory=list)


def default_compressors() -> list[str]:
    from ktm.compressors import names

    return [n for n in names() if n != "llmlingua2"]  # needs the llmlingua package and a hub: ask for it by name


def parse_args(argv: list[str]):
    """(options, ARGS for `ktm fit`): what compare does not know goes to the fresh fits."""
    p = OneLineParser(prog="ktm compare", allow_abbrev=False, description=(__doc__ or "").split("\n\n")[0],
                      epilog="Any other option (e.g. --trainer.max_time=00:01:00:00) is passed to each fresh `ktm fit`.")
    p.add_argument("--exp", default=None, help="experiment (ktm experiments lists them)")
    p.add_argument("--compressors", nargs="+", default=None, help="methods to compare (default: all but llmlingua2)")
    p.add_argument("--ks", nargs="+", default=["4"], help="K values (default 4); K=1 is the uncompressed `none` cell")
    p.add_argument("--root", default="checkpoints", help="folder that holds all runs")
    p.add_argument("--baseline-schedule", default="k", choices=BASELINE_SCHEDULES,
                   help="k: a baseline trains at its K alone; curriculum: on the merge's K curriculum (the same steps at each K)")
    p.add_argument("--extra", nargs="+", default=[], metavar="RUN",
                   help="finished runs of this experiment to add as extra rows (e.g. a merge started from a reading checkpoint)")
    p.add_argument("--dry-run", action="store_true", help="print what each cell needs and the commands, run nothing")
    a, rest = p.parse_known_args(argv)
    for arg in rest:
        opt = arg.split("=", 1)[0]
        if opt in RESERVED:
            raise KTMError(f"{opt} is set by ktm compare for each cell", f"drop it: {RESERVED[opt]}")
    return a, rest


def check_args(exp, compressors, ks) -> tuple[list[str], list[int]]:
    """The experiment exists, every compressor is registered, every K is a whole number >= 1."""
    from ktm.cli import available_experiments
    from ktm.compressors import names

    known = available_experiments()
    if exp is None or exp not in known:
        problem = "ktm compare needs --exp NAME" if exp is None else f"unknown experiment {exp!r}"
        raise KTMError(problem, f"use one of: {', '.join(known)}")
    compressors = list(dict.fromkeys(compressors or default_compressors()))
    for name in compressors:
        if name not in names():
            raise KTMError(f"unknown compressor {name!r} in --compressors", f"use any of: {', '.join(names())}")
    for k in ks:
        if not re.fullmatch(r"\d+", str(k)) or int(k) < 1:
            raise KTMError(f"K must be a whole number >= 1, got {k!r} in --ks", "pass e.g. --ks 2 4 (K=1 is the uncompressed `none` cell)")
    return compressors, sorted({int(k) for k in ks})


def plan_cells(compressors: list[str], ks: list[int], schedule: str = "k") -> list[Cell]:
    """`none` at K=1 (whenever it is asked for, or K=1 is); every other compressor at each K > 1."""
    cells = [Cell("none", 1)] if "none" in compressors or 1 in ks else []
    return cells + [Cell(c, k, schedule) for c in compressors if c != "none" for k in ks if k > 1]


def experiment_curriculum(exp: str) -> list:
    """data.k_schedule of the composed experiment (defaults.yaml, then <exp>.yaml after the experiments it extends;
    null = the largest model.ks)."""
    from ktm.cli import composed_experiment

    composed = composed_experiment(exp)
    schedule = (composed.get("data") or {}).get("k_schedule")
    return list(schedule) if schedule else [max((composed.get("model") or {}).get("ks") or [4])]


def _entry_ks(entry) -> list[int]:
    return list(entry) if isinstance(entry, (list, tuple)) else [entry]


def merge_schedule(schedule: list, k: int) -> list:
    """The experiment's curriculum up to K: each entry without its larger K (empty ones dropped), ending at K."""
    out = []
    for entry in schedule:
        kept = [x for x in _entry_ks(entry) if x <= k]
        if kept:
            out.append(kept if isinstance(entry, (list, tuple)) else kept[0])
    if not out or max(_entry_ks(out[-1])) != k:
        out.append(k)
    return out


def cell_settings(cell: Cell, schedule: list) -> list[str]:
    """The `ktm fit` options that make a cell: its compressor, model.ks (with K=1) and K schedule."""
    ks_schedule = merge_schedule(schedule, cell.k) if cell.follows_curriculum else [cell.k]
    ks = sorted({1, cell.k, *(x for e in ks_schedule for x in _entry_ks(e))})
    flat = lambda v: json.dumps(v, separators=(",", ":"))  # noqa: E731  ([1,[1,2]]: one shell word, YAML flow)
    return [f"--model.compressor={cell.compressor}", f"--model.ks={flat(ks)}", f"--data.k_schedule={flat(ks_schedule)}"]


def resume_checkpoint(folder: Path) -> Path | None:
    """The newest of checkpoints/last.ckpt and interrupted.ckpt (Ctrl-C saves the latter, later than the former)."""
    found = [p for p in (folder / "checkpoints" / "last.ckpt", folder / "checkpoints" / "interrupted.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def plan_cell(cell: Cell, exp: str, root: str, schedule: list, args: list[str]) -> Step:
    """What `cell` needs, decided from its run folder alone (see the module docstring)."""
    from ktm.training.run_folder import run_contents, run_path

    folder = run_path(root, exp, cell.run)
    config, last = folder / "config.yaml", folder / "checkpoints" / "last.ckpt"
    test = ["test", "--config", str(config)]  # the run's model: best.ckpt where it selected one, else last.ckpt
    present = run_contents(folder) if folder.is_dir() else []
    if not present:
        fit = ["fit", "--exp", exp, "--run", cell.run, "--root", str(root), *cell_settings(cell, schedule), *args]
        return Step(cell, "fit", "no run yet", [fit, test])
    doc = read_json(folder / "metrics.json", "metrics file") if (folder / "metrics.json").is_file() else {}
    made = (doc.get("model") or {}).get("compressor", cell.compressor)
    if made != cell.compressor:  # a folder renamed or written by hand: its numbers are not this cell's
        raise KTMError(f"run folder {folder} holds a model.compressor={made} run, not {cell.compressor}",
                       f"move it away (compare names cell folders {PREFIX}<compressor>_k<K>) and run ktm compare again")
    if f"k{cell.k}" in (doc.get("test") or {}):
        return Step(cell, "reuse", f"its metrics.json has test results at K={cell.k}")
    ckpt = resume_checkpoint(folder)
    if ckpt is None or not config.is_file():
        raise KTMError(f"run folder {folder} holds a run ({', '.join(present)}) without test results, config.yaml and a "
                       "checkpoint to resume it from", f"move it away (e.g. mv {folder} {folder}.broken) and run ktm compare "
                       "again to train that cell afresh")
    if "global_step" in doc and last.is_file():  # RunOutputs writes global_step when a fit ends: only the test is missing
        return Step(cell, "test", "its fit finished, its test did not", [test])
    resume = ["fit", "--config", str(config), "--ckpt_path", str(ckpt)]
    return Step(cell, "resume", f"half-finished: resumes from {ckpt.name}", [resume, test])


def run_command(command: list[str]) -> int:
    """`ktm <command>` as a subprocess (this interpreter), its output straight to ours; its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "ktm.cli", *command])
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the child got the same Ctrl-C (one process group): let it save its checkpoint
        return proc.wait()


def run_plan(steps: list[Step], runner=run_command) -> None:
    """Every command of every step in order; the first failure stops (a rerun picks up where it stopped)."""
    todo = [s for s in steps if s.commands]
    for i, step in enumerate(todo, 1):
        for command in step.commands:
            line = shlex.join(["ktm", *command])
            print(f"ktm compare: [{i}/{len(todo)}] {step.cell.run} ({step.state}): {line}", flush=True)
            code = runner(command)
            if code in (130, 143):  # Ctrl-C / SIGTERM: the cell saved its checkpoint and said so
                print("ktm compare: stopped; the same ktm compare resumes it", file=sys.stderr, flush=True)
                raise Interrupted(code)
            if code != 0:
                raise KTMError(f"cell {step.cell.run} failed: `{line}` exited with {code}",
                               "see its output above, fix that, then run the same ktm compare again "
                               "(finished cells are reused, a half-finished one resumes)")


def _is_merge(row: dict) -> bool:
    return row.get("method", row["compressor"]) == "merge"


def merge_gain(rows: list[dict]) -> dict:
    """Per K: merge's P-L F1, the strongest baseline's (the highest of the other methods at that K, extra
    runs left out) and merge / baseline - 1 (the paper's +28.2% on the tree). Keyed "<K>" for the merge
    cell and "<K> <label>" for an extra merge run."""
    out = {}
    for merge in (r for r in rows if _is_merge(r)):
        others = [r for r in rows if r["k"] == merge["k"] and not _is_merge(r) and not r.get("extra") and r.get("pl_f1") is not None]
        if not others or merge.get("pl_f1") is None:
            continue
        best = max(others, key=lambda r: r["pl_f1"])  # ties: the first in --compressors order
        relative = merge["pl_f1"] / best["pl_f1"] - 1 if best["pl_f1"] > 0 else None
        key = str(merge["k"]) if not merge.get("extra") else f"{merge['k']} {merge['compressor']}"
        out[key] = {"k": merge["k"], "merge": merge["pl_f1"], "method": merge["compressor"], "baseline": best["compressor"],
                    "baseline_pl_f1": best["pl_f1"], "relative": relative}
    return out


def _test_metrics(doc: dict, k: int) -> dict:
    """A metrics.json's test row at K, in the columns of its task (empty when it has none)."""
    row = (doc.get("test") or {}).get(f"k{k}") or {}
    return {key: row[key] for _, key in COLUMNS[task_of(doc, COLUMNS)] if row.get(key) is not None}


@dataclass(frozen=True)
class Extra:
    """An --extra run: its folder, its metrics.json (read once, checksum checked) and the compared K it has."""

    name: str
    run: Path
    doc: dict
    ks: list[int]

    @property
    def compressor(self) -> str:
        return (self.doc.get("model") or {}).get("compressor", "merge")

    @property
    def label(self) -> str:
        return f"{self.compressor} ({self.name})"


def extra_runs(exp: str, root: str, names: list[str], ks: list[int]) -> list[Extra]:
    """Each --extra run with its test results at the compared K; checked before any cell runs."""
    from ktm.training.run_folder import run_path

    out = []
    for name in dict.fromkeys(names):
        run = run_path(root, exp, name)
        if not (run / "metrics.json").is_file():
            raise KTMError(f"--extra run {run} has no metrics.json", f"finish it first (ktm fit, then ktm test), or drop {name} from --extra")
        doc = read_json(run / "metrics.json", "metrics file")
        mine = [k for k in ks if k > 1 and _test_metrics(doc, k)]
        if not mine:
            raise KTMError(f"--extra run {run} has no test results at K={', '.join(str(k) for k in ks if k > 1)}",
                           f"run ktm test --config {run / 'config.yaml'}, or pass its K in --ks")
        out.append(Extra(name, run, doc, mine))
    return out


def collect(exp: str, root: str, cells: list[Cell], extras: list[Extra] = ()) -> dict:
    """Each cell's test metrics at its K (its metrics.json read once, checksum checked), the --extra runs'
    rows after them, and merge's gain."""
    from ktm.training.run_folder import run_path

    rows, docs = [], []
    for cell in cells:
        run = run_path(root, exp, cell.run)
        doc = read_json(run / "metrics.json", "metrics file")
        metrics = _test_metrics(doc, cell.k)
        if not metrics:
            raise KTMError(f"run {run} has no test results at K={cell.k}",
                           f"run ktm test --config {run / 'config.yaml'}")
        rows.append(_row(cell.compressor, cell.k, exp, run, doc, metrics))
        docs.append(doc)
    for extra in extras:
        rows += [{**_row(extra.label, k, exp, extra.run, extra.doc, _test_metrics(extra.doc, k)), "method": extra.compressor,
                  "extra": True} for k in extra.ks]
        docs.append(extra.doc)
    return {"experiment": exp, "benchmark": (docs[0].get("data") or {}).get("benchmark"), "task": task_of(docs[0], COLUMNS),
            "split": "test", "cells": rows, "merge_gain": merge_gain(rows)}


def _row(label: str, k: int, exp: str, run: Path, doc: dict, metrics: dict) -> dict:
    """One report row: the method, its K and test metrics, and what its training cost (same budget, same stopping rule)."""
    return {"compressor": label, "k": k, "run": f"{exp}/{run.name}", "steps": doc.get("global_step"),
            "fit_seconds": doc.get("wall_seconds", {}).get("fit"), **metrics}


def render(results: dict) -> str:
    columns = COLUMNS[results["task"]]
    p = "accuracy" if results["task"] == "classification" else "ppl(K=1) / ppl of the same run"
    lines = [f"### `ktm compare` on `{results['experiment']}`: benchmark `{results['benchmark']}` ({results['task']}), "
             f"{results['split']} split", "",
             "One run per (method, K), all trained alike (the same experiment, data, trainer budget and seed); K=1 is the "
             f"uncompressed `none` run. P = {p}, L = 1 - compressed / original prompt tokens, P-L F1 = 2PL / (P + L). "
             "Steps: the optimizer steps each cell trained (the curriculum may stop a cell early); runs under the root. "
             + ("Every cell trained on the merge's K curriculum (`--baseline-schedule curriculum`)."
                if results.get("baseline_schedule") == "curriculum" else
                "The merge trained on the experiment's K curriculum, each baseline at its K alone."), ""]
    if results.get("command"):
        lines += ["```bash", results["command"], "```", ""]
    lines += ["| method | K | " + " | ".join(title for title, _ in columns) + " | steps | run |", "|---|---|" + "---|" * len(columns) + "---|---|"]
    for r in sorted(results["cells"], key=lambda r: r["k"]):  # stable: --compressors order within a K
        steps = "-" if r.get("steps") is None else str(r["steps"])
        lines.append(f"| {r['compressor']} | {r['k']} | " + " | ".join(_fmt(r.get(key)) for _, key in columns) + f" | {steps} | `{r['run']}` |")
    lines.append("")
    if results["merge_gain"]:
        lines += ["merge's P-L F1 against the strongest baseline (the highest P-L F1 of the other methods at the same K):", "",
                  "| K | merge | strongest baseline | its P-L F1 | merge's relative gain |", "|---|---|---|---|---|"]
        for g in results["merge_gain"].values():
            gain = "-" if g["relative"] is None else f"{g['relative']:+.1%}"
            merge = _fmt(g["merge"]) + ("" if g["method"] == "merge" else f" ({g['method']})")
            lines.append(f"| {g['k']} | {merge} | `{g['baseline']}` | {_fmt(g['baseline_pl_f1'])} | {gain} |")
        lines.append("")
    return "\n".join(lines + ["![quality vs compression L](pareto.png)"])


def _value(row: dict | None, key: str) -> float:
    return float("nan") if row is None or row.get(key) is None else row[key]


def pareto_figure(results: dict):
    """Quality vs compression L (one line per method over K, each from the shared K=1 `none` point), and
    the P-L F1 of every method at each K with merge's gain over the strongest baseline in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["cells"]
    classification = results["task"] == "classification"
    quality = [("accuracy", "accuracy (P)"), ("balanced_accuracy", "balanced accuracy")] if classification else \
              [("performance", "P = ppl(K=1) / ppl")]
    ref = next((r for r in rows if r["compressor"] == "none"), None)
    methods = [c for c in dict.fromkeys(r["compressor"] for r in rows) if c != "none"]
    color = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(quality) + 1, figsize=(5.4 * (len(quality) + 1), 4.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], quality):
        for m in methods:
            own = sorted((r for r in rows if r["compressor"] == m), key=lambda r: r["k"])
            pts = ([ref] if ref is not None else []) + own  # at K=1 every method is the uncompressed run
            ax.plot([_value(r, "compression") for r in pts], [_value(r, key) for r in pts], "o-", color=color[m],
                    lw=2.4 if m == "merge" else 1.2, label=m)
            for r in own if m == "merge" else []:  # every method's K sits at the same L: one label per K
                ax.annotate(f"K={r['k']}", (_value(r, "compression"), _value(r, key)), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if ref is not None:
            ax.plot([_value(ref, "compression")], [_value(ref, key)], "k*", ms=12, label="none (K=1, uncompressed)")
        if key == "accuracy":  # the same test set for every cell: one majority baseline
            majority = [r["majority_baseline"] for r in rows if r.get("majority_baseline") is not None]
            if majority:
                ax.axhline(statistics.fmean(majority), color="grey", ls="--", lw=1, label="majority baseline")
        ax.set_xlabel("compression L = 1 - compressed / original prompt tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    ks = sorted({r["k"] for r in rows if r["compressor"] != "none"})
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        pts = [(j, r) for j, k in enumerate(ks) for r in rows if r["compressor"] == m and r["k"] == k]
        ax.bar([j + (i - (len(methods) - 1) / 2) * width for j, _ in pts], [_value(r, "pl_f1") for _, r in pts], width,
               color=color[m], label=m)
    ax.set_xticks(range(len(ks)), [f"K={k}" for k in ks])
    ax.set_ylabel("P-L F1 = 2PL / (P + L)")
    gains = [f"K={g['k']}{'' if g['method'] == 'merge' else ' ' + g['method']}: {g['relative']:+.1%} vs {g['baseline']}"
             for g in results["merge_gain"].values() if g["relative"] is not None]
    ax.set_title("merge's P-L F1 gain over the strongest baseline\n" + ("\n".join(gains) or "(no merge and baseline at one K)"), fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    tallest = max((_value(r, "pl_f1") for r in rows if r["compressor"] != "none" and r.get("pl_f1") is not None), default=1.0)
    ax.set_ylim(0, 1.45 * tallest)  # headroom above the bars for the legend
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    fig.suptitle(f"{results['experiment']} ({results['benchmark']}, {results['split']} split): quality vs compression; "
                 "K=1 = the uncompressed run, shared by every line", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def write_outputs(results: dict, folder: Path) -> None:
    write_json(folder / "results.json", results)
    write_text(folder / "results.md", render(results) + "\n")
    fig = pareto_figure(results)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    write_with(folder / "pareto.png", lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str]) -> None:
    a, args = parse_args(argv)
    compressors, ks = check_args(a.exp, a.compressors, a.ks)
    schedule = experiment_curriculum(a.exp)
    cells = plan_cells(compressors, ks, a.baseline_schedule)
    steps = [plan_cell(c, a.exp, a.root, schedule, args) for c in cells]  # every folder checked before any cell runs
    extras = extra_runs(a.exp, a.root, a.extra, ks)
    for s in steps:
        print(f"ktm compare: {s.cell.run}: {s.state} ({s.why})")
    if a.dry_run:
        for s in steps:
            for command in s.commands:
                print(shlex.join(["ktm", *command]))
        return
    run_plan(steps)
    results = collect(a.exp, a.root, cells, extras)
    results["command"] = shlex.join(["ktm", "compare", *argv])
    results["baseline_schedule"] = a.baseline_schedule
    out = Path(a.root) / "compare" / (a.exp + ("_curriculum" if a.baseline_schedule == "curriculum" else ""))
    write_outputs(results, out)
    print(render(results))
    print(f"ktm compare: results in {out}/ (results.json, results.md, pareto.png)")
