"""`ktm curves`: a val metric against the step from the runs' TensorBoard events, PNG + JSON."""

from __future__ import annotations

import json
import re

import pytest
from torch.utils.tensorboard import SummaryWriter

from ktm.cli import main
from ktm.curves import read_curves


def _log(folder, points: dict[str, list[tuple[int, float]]]) -> None:
    """One event file in `folder` with these scalars, as a fit (or its resumption) writes them."""
    writer = SummaryWriter(str(folder))
    for tag, rows in points.items():
        for step, value in rows:
            writer.add_scalar(tag, value, step)
    writer.close()


@pytest.fixture
def runs(tmp_path):
    exp = tmp_path / "checkpoints" / "tree_k4"
    a, b = exp / "every_k", exp / "k8only"
    _log(a, {"val/k4/balanced_accuracy": [(49, 0.5), (99, 0.75)], "val/k8/balanced_accuracy": [(49, 0.5), (99, 0.625)],
             "val/k4/perplexity": [(49, 2.0), (99, 1.5)], "train/loss": [(10, 1.0)]})
    _log(b, {"val/k8/balanced_accuracy": [(49, 0.5), (99, 0.875)]})
    return a, b


def test_curves_write_the_points_of_each_run_and_k(runs, capsys):
    a, b = runs
    assert main(["curves", str(a), str(b)]) == 0
    out = a.parent / "curves_val_balanced_accuracy.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["points"] == {"every_k": {"k4": [[49, 0.5], [99, 0.75]], "k8": [[49, 0.5], [99, 0.625]]},
                               "k8only": {"k8": [[49, 0.5], [99, 0.875]]}}
    assert str(out) in capsys.readouterr().out


def test_a_resumed_run_keeps_the_later_value_of_a_step(tmp_path):
    run = tmp_path / "run"
    _log(run, {"val/k4/perplexity": [(49, 3.0), (99, 2.5)]})
    _log(run, {"val/k4/perplexity": [(99, 2.25), (149, 2.0)]})  # resumed from step 49: step 99 again
    assert read_curves(run, "val", "perplexity") == {4: [(49, 3.0), (99, 2.25), (149, 2.0)]}


def test_chosen_ks_metric_and_out(runs, tmp_path):
    a, b = runs
    out = tmp_path / "figs" / "k4_ppl.png"
    assert main(["curves", str(a), "--metric", "perplexity", "--ks", "4", "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["points"] == {"every_k": {"k4": [[49, 2.0], [99, 1.5]]}}


@pytest.mark.parametrize("args, message", [
    (["--metric", "loss"], r"no run logged val/k<K>/loss -> use one of --metric balanced_accuracy, perplexity"),
    (["--ks", "2"], r"no run logged val/balanced_accuracy at K=\[2\] -> leave those K out of --ks"),
    (["--out", "x.svg"], r"--out x.svg is not a .png file"),
])
def test_bad_requests_are_one_line(runs, args, message, capsys):
    a, _ = runs
    assert main(["curves", str(a), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)


def test_a_folder_without_events_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["curves", str(tmp_path / "missing")]) == 2
    assert "run folder" in capsys.readouterr().err
    assert main(["curves", str(tmp_path / "empty")]) == 2
    assert "holds no TensorBoard events" in capsys.readouterr().err


def test_every_run_is_in_the_legend_with_one_colour_in_every_panel():
    """A run missing from the last panel (here k1ref, K=1 only) still gets a legend entry, and a run that misses
    a panel does not shift the others' colours."""
    from ktm.curves import curves_figure

    curves = {"k1ref": {1: [(99, 0.9)]}, "merged": {1: [(99, 0.8)], 4: [(99, 0.7)]}}
    fig = curves_figure(curves, [1, 4], "balanced_accuracy", "val")
    left, right = fig.axes
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["k1ref", "merged", "chance"]
    colour = {ax: {line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (left, right)}
    assert colour[left]["merged"] == colour[right]["merged"] != colour[left]["k1ref"]
