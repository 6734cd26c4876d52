"""Render a run's metrics.json as a markdown table (written to <run>/results.md and by `ktm report`).

Every accuracy sits beside balanced accuracy and the majority-class baseline; every compressed K
beside the uncompressed K=1 of the same run.
"""

from __future__ import annotations

from pathlib import Path

from ktm.io import read_json, write_text


CLASSIFICATION_COLUMNS = [("accuracy", "accuracy"), ("balanced acc.", "balanced_accuracy"),
                          ("majority baseline", "majority_baseline"), ("compression L", "compression"), ("P-L F1", "pl_f1")]
PERPLEXITY_COLUMNS = [("perplexity", "perplexity"), ("uncompressed (K=1)", "perplexity_uncompressed"),
                      ("P = ppl1/ppl", "performance"), ("compression L", "compression"), ("P-L F1", "pl_f1")]


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(metrics: dict, title: str = "") -> str:
    data = metrics.get("data", {})
    lines = [f"### {title}".rstrip(), "",
             f"benchmark `{data.get('benchmark')}` ({data.get('task')}), stage `{data.get('stage')}`, "
             f"source `{data.get('source')}`, global step {metrics.get('global_step')}, "
             f"wall time (s) {metrics.get('wall_seconds')}", ""]
    classification = data.get("task") == "classification"
    columns = CLASSIFICATION_COLUMNS if classification else PERPLEXITY_COLUMNS
    for split in ("test", "val"):
        rows = metrics.get(split)
        if not rows:
            continue
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
    if metrics.get("truncated_prompts"):
        lines.append(f"prompts truncated by long_prompt_policy: {metrics['truncated_prompts']}")
    return "\n".join(lines)


def write_report(run: str | Path) -> Path:
    run = Path(run)
    text = render(read_json(run / "metrics.json", "metrics file"), title=f"{run.parent.name}/{run.name}")
    return write_text(run / "results.md", text + "\n")


def main(argv: list[str]) -> None:
    for run in argv or []:
        path = write_report(run)
        print(path.read_text())
