"""`ktm curves`: one metric against the training step, a panel per K and a line per run, read from the runs'
TensorBoard events. What TensorBoard shows, as a PNG a README can hold, and its points as JSON beside it.

    ktm curves checkpoints/tree_k4/every_k8_n1600_s0 checkpoints/tree_k4/k8only_n1600_s0 \
        [--metric balanced_accuracy] [--split val] [--ks 4 8] [--out checkpoints/tree_k4/k8_curves.png]

A run is named by its folder. A resumed (or later tested) run has several event files: they are read together,
and a step written twice keeps its later value (the resumed run's), as TensorBoard draws it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ktm.errors import KTMError, OneLineParser
from ktm.io import write_json, write_with

Points = list[tuple[int, float]]


# How a run logs a metric per K (ktm.training.callbacks): <split>/k<K>/<metric>
K_TAG = re.compile(r"(val|test|train|speed)/k(\d+)/(.+)")


def k_scalars(run: str | Path) -> dict[tuple[str, int, str], list[tuple[float, int, float]]]:
    """{(split, K, metric): [(wall time, step, value), ...]} of the `<split>/k<K>/<metric>` scalars in the run's own
    event files (not by_k/), file after file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[tuple[str, int, str], list[tuple[float, int, float]]] = {}
    for path in sorted(Path(run).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            m = K_TAG.fullmatch(tag)
            if m:
                out.setdefault((m[1], int(m[2]), m[3]), []).extend((e.wall_time, e.step, e.value) for e in acc.Scalars(tag))
    return out


def read_curves(run: Path, split: str, metric: str) -> dict[int, Points]:
    """{K: [(step, value), ...] by step} of `<split>/k<K>/<metric>`; a step written twice keeps its later value."""
    return {k: sorted({step: value for _, step, value in sorted(rows)}.items())
            for (s, k, m), rows in k_scalars(run).items() if (s, m) == (split, metric)}


def metric_names(run: Path, split: str) -> list[str]:
    """The `<split>/k<K>/<metric>` metrics a run logged (for the error line when one is missing)."""
    return sorted({m for s, _, m in k_scalars(run) if s == split})


def curves_figure(curves: dict[str, dict[int, Points]], ks: list[int], metric: str, split: str):
    """One panel per K, one line per run; balanced accuracy gets its chance level (0.5 on two labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.4), squeeze=False, sharey=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: cycle[i % len(cycle)] for i, name in enumerate(curves)}  # a run keeps its colour in every panel
    for ax, k in zip(axes[0], ks):
        for name, by_k in curves.items():
            if by_k.get(k):
                steps, values = zip(*by_k[k])
                ax.plot(steps, values, marker=".", ms=3, lw=1.2, label=name, color=color[name])
        if metric == "balanced_accuracy":
            ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance")
        ax.set_title(f"K={k}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{split} {metric}")
    # one legend for every run, also those missing from the last panel (a K=1-only reference, say)
    labelled = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    axes[0][-1].legend(labelled.values(), labelled.keys(), fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str]) -> None:
    p = OneLineParser(prog="ktm curves", description="A metric against the training step: a panel per K, a line per run.")
    p.add_argument("runs", nargs="+", help="run folders (checkpoints/<exp>/<run>)")
    p.add_argument("--metric", default="balanced_accuracy", help="logged as <split>/k<K>/<metric> (e.g. perplexity, read_perplexity)")
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--ks", type=int, nargs="+", default=None, help="panels (default: every K any run logged)")
    p.add_argument("--out", default=None, help="the PNG (default: <first run's experiment folder>/curves_<split>_<metric>.png); "
                                               "its points go to the same name with .json")
    a = p.parse_args(argv)
    runs = [Path(r) for r in a.runs]
    for run in runs:
        if not run.is_dir():
            raise KTMError(f"run folder {run} does not exist", "pass run folders such as checkpoints/tree_k4/default")
        if not any(run.glob("events.out.tfevents.*")):
            raise KTMError(f"{run} holds no TensorBoard events", "pass a folder written by ktm fit (checkpoints/<exp>/<run>)")
    curves = {run.name: read_curves(run, a.split, a.metric) for run in runs}
    if not any(curves.values()):
        known = sorted({m for run in runs for m in metric_names(run, a.split)})
        raise KTMError(f"no run logged {a.split}/k<K>/{a.metric}", f"use one of --metric {', '.join(known) or '(none logged yet)'}")
    ks = a.ks or sorted({k for by_k in curves.values() for k in by_k})
    missing = [k for k in ks if not any(by_k.get(k) for by_k in curves.values())]
    if missing:
        raise KTMError(f"no run logged {a.split}/{a.metric} at K={missing}", "leave those K out of --ks")
    out = Path(a.out) if a.out else runs[0].parent / f"curves_{a.split}_{a.metric}.png"
    if out.suffix != ".png":
        raise KTMError(f"--out {out} is not a .png file", "name the figure e.g. curves.png")
    fig = curves_figure(curves, ks, a.metric, a.split)
    import matplotlib.pyplot as plt

    write_with(out, lambda path: fig.savefig(path, format="png", dpi=110))
    plt.close(fig)
    points = {name: {f"k{k}": by_k[k] for k in ks if k in by_k} for name, by_k in curves.items()}
    write_json(out.with_suffix(".json"), {"metric": a.metric, "split": a.split, "runs": [str(r) for r in runs], "points": points})
    print(f"ktm curves: {out} and {out.with_suffix('.json')}")
