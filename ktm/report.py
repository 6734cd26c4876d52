"""Render a run's metrics.json as a markdown table (written to <run>/results.md and by `ktm report`),
and the runs of an experiment folder as mean ± std over seeds (<experiment>/summary.md, summary.json).

Every accuracy sits beside balanced accuracy and the majority-class baseline; every compressed K
beside the uncompressed K=1 of the same run, and beside a K=1 LoRA trained alone (`make reference`)
when the experiment folder holds one, with the gap to it (GAP) for the means and for each seed's pair of runs.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from ktm.errors import KTMError
from ktm.io import read_json, write_json, write_text


CLASSIFICATION_COLUMNS = [("accuracy", "accuracy"), ("balanced acc.", "balanced_accuracy"),
                          ("majority baseline", "majority_baseline"), ("compression L", "compression"), ("P-L F1", "pl_f1")]
PERPLEXITY_COLUMNS = [("perplexity", "perplexity"), ("uncompressed (K=1)", "perplexity_uncompressed"),
                      ("P = ppl1/ppl", "performance"), ("compression L", "compression"), ("P-L F1", "pl_f1")]
BASE_COLUMNS = [("bare base (K=1, no LoRA)", "perplexity_base"), ("ppl / base ppl", "perplexity_vs_base")]
ADAPTED_COLUMNS = [("positions read", "merged_tokens_mean"), ("tokens off the fixed K", "adapted_share")]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _stop(metrics: dict) -> str:
    """What ended the fit (metrics.json `stop`, runs since 2026-12-08), loudest where the wall-clock cap cut it."""
    stop = metrics.get("stop") or {}
    if not stop:
        return ""
    if stop.get("by") == "max_time":
        return f" (**cut by trainer.max_time** short of {stop.get('planned_steps') or 'its'} planned steps)"
    return f" (ended by {stop.get('by')})"


def render(metrics: dict, title: str = "") -> str:
    data = metrics.get("data", {})
    lines = [f"### {title}".rstrip(), "",
             f"benchmark `{data.get('benchmark')}` ({data.get('task')}), stage `{data.get('stage')}`, "
             f"source `{data.get('source')}`, global step {metrics.get('global_step')}{_stop(metrics)}, "
             f"wall time (s) {metrics.get('wall_seconds')}", ""]
    chosen = metrics.get("selected")
    if chosen:  # checkpoint.monitor: val and test below are of this checkpoint, not of the final step
        lines += [f"model: the best validation, step {chosen['step']} of {chosen['final_step']} "
                  f"({chosen['monitor']} {_fmt(chosen['value'], 4)}, {chosen['checkpoint']})", ""]
    classification = data.get("task") == "classification"
    model = chosen["checkpoint"] if chosen else "last.ckpt"
    for split in ("test", "val"):
        rows = metrics.get(split)
        if not rows:
            continue
        evaluated = metrics.get("evaluated", {}).get(split)
        if evaluated and evaluated != model:  # `ktm test --ckpt_path` on another checkpoint: say so above its numbers
            lines += [f"{split}: of {evaluated}, not the run's model ({model})", ""]
        columns = CLASSIFICATION_COLUMNS if classification else PERPLEXITY_COLUMNS
        if any("auroc" in m for m in rows.values()):  # runs since 2026-12-07: the threshold-free ranking beside accuracy
            columns = columns[:3] + [("ROC AUC", "auroc")] + columns[3:]
        if any("perplexity_base" in m for m in rows.values()):  # model.eval_base: the bare base beside each K
            columns = PERPLEXITY_COLUMNS + BASE_COLUMNS
        if any(m.get("adapted_share") for m in rows.values()):  # budget policy: how far its layouts left fixed K
            columns = columns + ADAPTED_COLUMNS
        lines += ["| split | K | examples | " + " | ".join(title for title, _ in columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        for k, m in sorted(rows.items(), key=lambda kv: int(kv[0][1:])):
            cells = " | ".join(_fmt(m.get(key)) for _, key in columns)
            lines.append(f"| {split} | {k[1:]} | {int(m['examples'])} | {cells} |")
        if not classification:
            gen = {k: m for k, m in rows.items() if "exact_match" in m}
            if gen:
                lines += ["", "| split | K | generated | exact match | line edit similarity |", "|---|---|---|---|---|"]
                for k, m in sorted(gen.items(), key=lambda kv: int(kv[0][1:])):
                    lines.append(f"| {split} | {k[1:]} | {int(m['generated'])} | {_fmt(m['exact_match'])} | {_fmt(m['line_similarity'])} |")
        lines.append("")
    speed = metrics.get("speed")
    if speed:
        lines += ["| training K | samples/s | prompt tokens/s |", "|---|---|---|"]
        for k, s in sorted(speed.items()):
            lines.append(f"| {k[1:]} | {_fmt(s['samples_per_s'], 2)} | {_fmt(s['prompt_tokens_per_s'], 1)} |")
        lines.append("")
    watch = metrics.get("encoder_watch")
    if watch:  # logged every log_every_n_steps steps; the warning fires above DIVERGING_ENCODER
        lines += ["| K | largest encoder correction ratio (step) | divergence warning |", "|---|---|---|"]
        for k, w in sorted(watch.items(), key=lambda kv: int(kv[0][1:])):
            lines.append(f"| {k[1:]} | {_fmt(w['max_correction_ratio'])} ({w['step']}) | {'yes' if w['warned'] else 'none'} |")
        lines.append("")
    if metrics.get("truncated_prompts"):
        lines.append(f"prompts truncated by long_prompt_policy: {metrics['truncated_prompts']}")
    return "\n".join(lines)


def write_report(run: str | Path) -> Path:
    run = Path(run)
    text = render(read_json(run / "metrics.json", "metrics file"), title=f"{run.parent.name}/{run.name}")
    return write_text(run / "results.md", text + "\n")


# -- several runs: mean ± std over seeds ------------------------------------------------------------
SEEDED = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")  # make train SEEDS=... names its runs <run>_s<seed>
REFERENCES = ("k1ref_s*", "k1ref")  # make reference [SEEDS=...]
REFERENCE_TITLE = "uncompressed reference (K=1 LoRA trained alone)"
SUMMARY_COLUMNS = {"classification": [("accuracy", "accuracy"), ("balanced acc.", "balanced_accuracy"),
                                      ("majority baseline", "majority_baseline"), ("P-L F1", "pl_f1")],
                   "perplexity": [("perplexity", "perplexity"), ("P = ppl1/ppl", "performance"), ("P-L F1", "pl_f1")]}
WHERE = "pass a run folder (checkpoints/<exp>/<run>) or an experiment folder (checkpoints/<exp>)"


def is_run(folder: Path) -> bool:
    return (folder / "metrics.json").is_file()


def runs_in(path: Path) -> list[Path]:
    """`path` itself when it is a run folder, else the run folders in it."""
    if not path.exists():
        raise KTMError(f"{path} does not exist", WHERE)
    if is_run(path):
        return [path]
    # `<run>.old-<time>` folders are runs that --overwrite moved aside: kept on disk, not in the summary
    runs = sorted(p for p in path.iterdir() if is_run(p) and ".old-" not in p.name) if path.is_dir() else []
    if not runs:
        raise KTMError(f"{path} holds no runs (no metrics.json in it or in any folder in it)",
                       f"{WHERE}; a run writes metrics.json when its fit or test ends")
    return runs


def group_of(run: Path) -> tuple[str, int | None]:
    """(group name, seed). Seeded runs group as `<name>_s*`, apart from a plain `<name>` run: that one
    was seeded by its config, very likely with a seed the `_s<seed>` runs repeat."""
    m = SEEDED.match(run.name)
    return (f"{m['name']}_s*", int(m["seed"])) if m else (run.name, None)


def stats(values: dict[str, float]) -> dict:
    """Mean, sample std (n - 1; None for one run) and each run's value."""
    numbers = list(values.values())
    return {"mean": statistics.fmean(numbers), "std": statistics.stdev(numbers) if len(numbers) > 1 else None,
            "n": len(numbers), "values": values}


def aggregate(docs: dict[str, dict], keys: list[str]) -> dict:
    """{split: {"k<K>": {metric: stats}}} over the runs `docs` ({run name: metrics.json})."""
    found: dict = {}
    for run, doc in docs.items():
        for split in ("test", "val"):
            for k, m in (doc.get(split) or {}).items():
                for key in keys:
                    if m.get(key) is not None:
                        found.setdefault(split, {}).setdefault(k, {}).setdefault(key, {})[run] = m[key]
    return {split: {k: {key: stats(v) for key, v in per_key.items()} for k, per_key in rows.items()}
            for split, rows in found.items()}


def reference_for(name: str, groups: dict) -> str | None:
    if name in REFERENCES:
        return None
    order = REFERENCES if name.endswith("_s*") else REFERENCES[::-1]  # seeded beside seeded when both exist
    return next((ref for ref in order if ref in groups), None)


def task_of(doc: dict, columns: dict) -> str:
    """The task of a metrics.json whose columns `columns` knows; anything else reads as perplexity."""
    task = (doc.get("data") or {}).get("task")
    return task if task in columns else "perplexity"


def machine_of(doc: dict) -> str | None:
    """The machine a run trained on, from its metrics.json `environment` (CPU, then any CUDA devices); None where
    it was not recorded. bf16 kernels round differently across CPUs, and a CPU without native bf16 trains in float32,
    so runs of two machines do not train alike."""
    fit = (doc.get("environment") or {}).get("fit") or {}
    parts = [fit["cpu"]] if fit.get("cpu") else []
    if parts and "avx512_bf16" in fit:  # one CPU name covers kinds with and without native bf16 (2026-12-08: AMD EPYC)
        flags = [name for key, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if fit.get(key)]
        parts[0] += f" ({', '.join(flags)})" if flags else " (no native bf16)"
    return " + ".join(parts + [str(d) for d in fit.get("cuda_devices") or []]) or None


def cut_by_time(doc: dict) -> str | None:
    """'step N of M' where trainer.max_time cut the run's fit short of its budget (metrics.json stop), else None."""
    stop = doc.get("stop") or {}
    return f"step {doc.get('global_step')} of {stop.get('planned_steps')}" if stop.get("by") == "max_time" else None


def render_cut(group: dict, reference: dict | None) -> list[str]:
    """One line naming the runs of a group and its reference that trainer.max_time cut short (none otherwise)."""
    cut = [f"{run} ({where})" for g in (group, reference or {}) for run, where in (g.get("cut_by_time") or {}).items() if where]
    if not cut:
        return []
    return [f"*cut by trainer.max_time* ({'; '.join(cut)}): these stopped short of their step budget, so they trained "
            "less than the others (a slower machine); their numbers are not the recipe's", ""]


def render_machines(group: dict, reference: dict | None) -> list[str]:
    """One line where the runs of a group and its reference trained on more than one machine (none otherwise)."""
    by_machine: dict[str, list[str]] = {}
    for g in (group, reference or {}):
        for run, machine in (g.get("machines") or {}).items():
            if machine:
                by_machine.setdefault(machine, []).append(run)
    if len(by_machine) < 2:
        return []
    where = "; ".join(f"{machine}: {', '.join(runs)}" for machine, runs in by_machine.items())
    return [f"*machines differ* ({where}): runs of two machines do not train alike (README Troubleshooting), so their "
            "difference holds the machine's too", ""]


def summarize(runs: list[Path], columns: dict = SUMMARY_COLUMNS) -> dict:
    """The runs of one experiment folder by group: runs, seeds, task and the stats per split and K of the
    metrics in `columns` ({task: [(title, key)]}; `ktm compare` asks for every column of `render`'s)."""
    members: dict[str, list[tuple[int | None, Path]]] = {}
    for run in runs:
        name, seed = group_of(run)
        members.setdefault(name, []).append((seed, run))
    groups = {}
    for name, pairs in sorted(members.items()):
        pairs.sort(key=lambda p: (p[0] or 0, p[1].name))
        docs = {run.name: read_json(run / "metrics.json", "metrics file") for _, run in pairs}
        first = next(iter(docs.values()))
        data, task = first.get("data", {}), task_of(first, columns)
        groups[name] = {"runs": list(docs), "seeds": [seed for seed, _ in pairs if seed is not None], "task": task,
                        "benchmark": data.get("benchmark"), "machines": {run: machine_of(doc) for run, doc in docs.items()},
                        "cut_by_time": {run: cut_by_time(doc) for run, doc in docs.items()},
                        "splits": aggregate(docs, [key for _, key in columns[task]])}
    for name, group in groups.items():
        group["reference"] = reference_for(name, groups)
        if group["reference"]:
            group["reference_gap"] = reference_gap(group, groups[group["reference"]])
    return groups


# What a merged K costs against the K=1 LoRA trained alone: points of balanced accuracy, or a perplexity ratio.
# {task: (metric, what the gap is, gap(merged, reference), how a gap is written)}
GAP = {"classification": ("balanced_accuracy", "points of balanced accuracy, K minus the reference",
                          lambda merged, ref: 100 * (merged - ref), "{:+.1f}".format),
       "perplexity": ("perplexity", "perplexity, K over the reference", lambda merged, ref: merged / ref, "{:.3f}x".format)}


def reference_gap(group: dict, reference: dict) -> dict:
    """{split: {"k<K>": {"mean": gap of the means, "by_seed": {seed: gap of that seed's two runs}}}} for each
    K > 1 of `group` (GAP by task). Seeds pair runs of the same seed, the way issue #15 compares them; where
    some pair, the means are over those seeds only (one seed's run against three references' mean would mix
    the seeds' spread into its gap), else over all runs of each side."""
    key, _, gap, _ = GAP[group["task"]]
    out: dict = {}
    for split, rows in group["splits"].items():
        ref = reference["splits"].get(split, {}).get("k1", {}).get(key)
        if ref is None:
            continue
        ref_by_seed = {group_of(Path(run))[1]: v for run, v in ref["values"].items()}
        for k, m in rows.items():
            if k == "k1" or key not in m:
                continue
            pairs = {seed: (v, ref_by_seed[seed]) for run, v in m[key]["values"].items()
                     if (seed := group_of(Path(run))[1]) is not None and seed in ref_by_seed}
            means = ((statistics.fmean(a for a, _ in pairs.values()), statistics.fmean(b for _, b in pairs.values()))
                     if pairs else (m[key]["mean"], ref["mean"]))
            out.setdefault(split, {})[k] = {"mean": gap(*means), "by_seed": {seed: gap(*p) for seed, p in pairs.items()}}
    return out


def render_gap(group: dict) -> list[str]:
    """One line per split: the gap of each merged K to the reference, with each seed's gap in parentheses."""
    _, title, _, fmt = GAP[group["task"]]
    lines = []
    for split, rows in group.get("reference_gap", {}).items():
        cells = []
        for k, g in sorted(rows.items(), key=lambda kv: int(kv[0][1:])):
            seeds = ", ".join(f"s{seed} {fmt(g['by_seed'][seed])}" for seed in sorted(g["by_seed"]))
            cells.append(f"K={k[1:]} **{fmt(g['mean'])}**" + (f" ({seeds})" if seeds else ""))
        lines.append(f"- {split}, {title}: " + "; ".join(cells))
    return lines + [""] if lines else []


def _cell(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return _fmt(s["mean"])
    return f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({', '.join(_fmt(v) for v in s['values'].values())})"


def _row(split: str, k: str, m: dict, keys: list[str]) -> str:
    n = max(s["n"] for s in m.values())
    return f"| {split} | {k} | {n} | " + " | ".join(_cell(m.get(key)) for key in keys) + " |"


def render_group(name: str, group: dict, reference: dict | None) -> list[str]:
    columns = SUMMARY_COLUMNS[group["task"]]
    keys = [key for _, key in columns]
    lines = [f"#### `{name}`: {len(group['runs'])} run(s): {', '.join(group['runs'])}", ""]
    if reference is not None:
        lines += [f"*reference K=1*: {REFERENCE_TITLE}, `{group['reference']}` ({', '.join(reference['runs'])})", ""]
    lines += render_machines(group, reference) + render_cut(group, reference)
    lines += ["| split | K | n | " + " | ".join(title for title, _ in columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for split in ("test", "val"):
        rows = group["splits"].get(split, {})
        for k, m in sorted(rows.items(), key=lambda kv: int(kv[0][1:])):
            lines.append(_row(split, k[1:], m, keys))
        ref = (reference or {}).get("splits", {}).get(split, {}).get("k1")
        if rows and ref:  # right under the merged K of the same split
            lines.append(_row(split, "*reference K=1*", ref, keys))
    return lines + [""] + render_gap(group)


def render_summary(title: str, groups: dict) -> str:
    lines = [f"### {title}: mean ± sample std over seeds (each run's value in parentheses)", ""]
    for name, group in groups.items():
        lines += render_group(name, group, groups.get(group["reference"]))
    return "\n".join(lines)


def report_runs(folder: Path, runs: list[Path], write: bool) -> str:
    """The summary of runs of the experiment folder `folder`; with `write` also its summary.{md,json}."""
    groups = summarize(runs)
    text = render_summary(folder.name, groups)
    if write:
        write_json(folder / "summary.json", {"experiment": folder.name, "groups": groups})
        write_text(folder / "summary.md", text + "\n")
    return text


def main(argv: list[str]) -> None:
    paths = [Path(p) for p in argv or []]
    if len(paths) == 1 and is_run(paths[0]):  # one run: its own table, as always
        print(write_report(paths[0]).read_text())
        return
    by_folder: dict[Path, dict[Path, Path]] = {}
    for path in paths:
        for run in runs_in(path):
            by_folder.setdefault(run.parent.resolve(), {})[run.resolve()] = run
    # summary.* only for a folder named as a whole: a few of its runs must not replace its full summary
    named = {p.resolve() for p in paths if not is_run(p)}
    for folder, runs in by_folder.items():  # a group's reference is sought in its own experiment folder only
        print(report_runs(folder, sorted(runs.values(), key=lambda r: r.name), folder in named))
