"""`ktm compare`: cells planned from their run folders (fit, resume, test, reuse) with the exact command lines,
and the report + pareto.png from a fixture of run folders shaped like those ktm.training writes. Nothing trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import ktm.cli
from ktm.cli import Interrupted
from ktm.cli import main as cli_main
from ktm.compare import Cell, check_args, collect, plan_cell, plan_cells, run_plan, write_outputs
from ktm.errors import KTMError
from ktm.io import write_json

REPO = Path(__file__).resolve().parents[1]
EXP = "toy"
SCHEDULE = [1, 2, 4]


@pytest.fixture(autouse=True)
def experiments(tmp_path, monkeypatch):
    """An experiments folder of our own: the tests do not depend on the real configs' curricula."""
    folder = tmp_path / "experiments"
    folder.mkdir()
    (folder / "defaults.yaml").write_text("model:\n  ks: [4]\ndata:\n  k_schedule: null\n")
    (folder / f"{EXP}.yaml").write_text("model:\n  ks: [1, 2, 4]\ndata:\n  k_schedule: [1, 2, 4]\n")
    monkeypatch.setattr(ktm.cli, "EXPERIMENTS", folder)
    return folder


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "ck"


def _row(acc: float, bal: float, compression: float, f1: float) -> dict:
    return {"accuracy": acc, "balanced_accuracy": bal, "majority_baseline": 0.625, "compression": compression,
            "pl_f1": f1, "perplexity": 1.3, "examples": 600.0, "prompt_tokens_mean": 29.0, "merged_tokens_mean": 29.0 * (1 - compression)}


def _metrics(compressor: str, k: int, acc: float, bal: float, f1: float, test: bool = True, fitted: bool = True) -> dict:
    """A metrics.json as RunOutputs writes it: val at fit end (+ global_step), test rows added by `ktm test`."""
    rows = {"k1": _row(0.875, 0.875, 0.0, 0.0), **({f"k{k}": _row(acc, bal, 0.75, f1)} if k > 1 else {})}
    doc = {"data": {"benchmark": "tree", "task": "classification", "stage": "small", "source": "generated"},
           "model": {"compressor": compressor, "ks": sorted({1, k})}, "val": rows, "wall_seconds": {"fit": 10.0}}
    if fitted:
        doc["global_step"] = 100
    if test:
        doc["test"] = rows
    return doc


def _cell_folder(root: Path, cell: Cell, doc: dict | None = None, ckpts: tuple[str, ...] = ("last.ckpt",), config: bool = True) -> Path:
    folder = root / EXP / cell.run
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ckpts:
        (folder / "checkpoints" / name).write_bytes(b"ckpt")
    if config:
        (folder / "config.yaml").write_text("experiment: toy\n")
    if doc is not None:
        write_json(folder / "metrics.json", doc)  # atomic, with the checksum ktm.report verifies
    return folder


# -- planning --------------------------------------------------------------------------------------------


def test_cells_are_none_at_k1_and_every_other_compressor_at_each_k():
    assert plan_cells(["merge", "none", "truncate_tail"], [4]) == [Cell("none", 1), Cell("merge", 4), Cell("truncate_tail", 4)]
    assert plan_cells(["merge"], [1, 2, 4]) == [Cell("none", 1), Cell("merge", 2), Cell("merge", 4)]  # K=1 is the `none` cell
    assert plan_cells(["merge"], [4]) == [Cell("merge", 4)]
    assert Cell("self_information", 4).run == "cmp_self_information_k4"
    compressors, ks = check_args(EXP, None, ["4", "2", "4"])
    assert "llmlingua2" not in compressors and compressors[0] == "merge" and "none" in compressors and ks == [2, 4]


def test_fresh_cells_fit_then_test_with_their_settings(root):
    args = ["--trainer.max_epochs=1"]
    run = root / EXP
    merge = plan_cell(Cell("merge", 4), EXP, str(root), SCHEDULE, args)
    assert merge.state == "fit" and merge.commands == [
        ["fit", "--exp", EXP, "--run", "cmp_merge_k4", "--root", str(root), "--model.compressor=merge", "--model.ks=[1,2,4]",
         "--data.k_schedule=[1,2,4]", "--trainer.max_epochs=1"],
        ["test", "--config", f"{run}/cmp_merge_k4/config.yaml"]]  # ktm test evaluates the run's model (best.ckpt or last.ckpt)
    # the merge keeps the experiment's curriculum up to its K; a baseline trains at its K alone, with K=1 in ks
    merge2 = plan_cell(Cell("merge", 2), EXP, str(root), SCHEDULE, []).commands[0]
    assert merge2[7:] == ["--model.compressor=merge", "--model.ks=[1,2]", "--data.k_schedule=[1,2]"]
    mixed = plan_cell(Cell("merge", 2), EXP, str(root), [1, [1, 2], [1, 2, 4]], []).commands[0]
    assert mixed[-1] == "--data.k_schedule=[1,[1,2],[1,2]]"
    tail = plan_cell(Cell("truncate_tail", 4), EXP, str(root), SCHEDULE, args).commands[0]
    assert tail[7:] == ["--model.compressor=truncate_tail", "--model.ks=[1,4]", "--data.k_schedule=[4]", "--trainer.max_epochs=1"]
    none = plan_cell(Cell("none", 1), EXP, str(root), SCHEDULE, []).commands[0]
    assert none[7:] == ["--model.compressor=none", "--model.ks=[1]", "--data.k_schedule=[1]"]


def test_the_curriculum_of_an_extending_experiment_follows_its_chain(experiments):
    """An experiment with `extends:` takes its parent's K schedule unless it sets its own."""
    from ktm.compare import experiment_curriculum

    (experiments / "child.yaml").write_text(f"extends: {EXP}\nmodel:\n  lr_lora: 0.001\n")
    (experiments / "grandchild.yaml").write_text("extends: child\ndata:\n  k_schedule: [1, 8]\n")
    assert experiment_curriculum("child") == SCHEDULE
    assert experiment_curriculum("grandchild") == [1, 8]


def test_baselines_on_the_merges_curriculum_are_cells_of_their_own(root, capsys):
    """--baseline-schedule curriculum: a baseline gets the merge's K schedule (the same steps at each K) in a
    folder of its own; none and merge are the same cells under both rules, so they are shared."""
    cells = plan_cells(["merge", "none", "truncate_tail"], [4], "curriculum")
    assert [c.run for c in cells] == ["cmp_none_k1", "cmp_merge_k4", "cmp_truncate_tail_k4_curriculum"]
    tail = plan_cell(cells[2], EXP, str(root), SCHEDULE, []).commands[0]
    assert tail[3:] == ["--run", "cmp_truncate_tail_k4_curriculum", "--root", str(root), "--model.compressor=truncate_tail",
                        "--model.ks=[1,2,4]", "--data.k_schedule=[1,2,4]"]
    assert plan_cell(cells[1], EXP, str(root), SCHEDULE, []).commands == plan_cell(Cell("merge", 4), EXP, str(root), SCHEDULE, []).commands
    assert plan_cell(cells[0], EXP, str(root), SCHEDULE, []).commands[0][7:] == ["--model.compressor=none", "--model.ks=[1]",
                                                                                  "--data.k_schedule=[1]"]
    for cell in cells:  # finished: the report goes to its own folder and says the rule
        _cell_folder(root, cell, _metrics(cell.compressor, cell.k, 0.75, 0.75, 0.75))
    assert cli_main(["compare", "--exp", EXP, "--root", str(root), "--compressors", "merge", "none", "truncate_tail",
                     "--baseline-schedule", "curriculum"]) == 0
    results = json.loads((root / "compare" / f"{EXP}_curriculum" / "results.json").read_text())
    assert results["baseline_schedule"] == "curriculum" and results["cells"][2]["run"] == f"{EXP}/cmp_truncate_tail_k4_curriculum"
    assert "Every cell trained on the merge's K curriculum" in (root / "compare" / f"{EXP}_curriculum" / "results.md").read_text()
    assert not (root / "compare" / EXP).exists()
    capsys.readouterr()
    assert cli_main(["compare", "--exp", EXP, "--dry-run", "--baseline-schedule", "same"]) == 2
    assert "--baseline-schedule: invalid choice: 'same'" in capsys.readouterr().err


def test_a_complete_cell_is_reused(root):
    _cell_folder(root, Cell("merge", 4), _metrics("merge", 4, 0.75, 0.75, 0.75))
    step = plan_cell(Cell("merge", 4), EXP, str(root), SCHEDULE, ["--trainer.max_epochs=1"])
    assert (step.state, step.commands) == ("reuse", [])


def test_a_half_finished_cell_is_resumed_not_restarted(root):
    cell = Cell("truncate_tail", 4)
    folder = _cell_folder(root, cell, _metrics("truncate_tail", 4, 0.5, 0.5, 0.6, test=False, fitted=False))
    step = plan_cell(cell, EXP, str(root), SCHEDULE, ["--trainer.max_epochs=1"])  # ARGS: fresh fits only
    config, last = f"{folder}/config.yaml", f"{folder}/checkpoints/last.ckpt"
    assert step.state == "resume" and step.commands == [["fit", "--config", config, "--ckpt_path", last],
                                                        ["test", "--config", config]]
    # no metrics.json yet (killed in its first epoch) is half-finished too
    (folder / "metrics.json").unlink()
    (folder / "metrics.json.sha256").unlink()
    assert plan_cell(cell, EXP, str(root), SCHEDULE, []).commands[0] == ["fit", "--config", config, "--ckpt_path", last]


def test_a_cell_stopped_by_ctrl_c_resumes_from_its_newer_interrupted_checkpoint(root):
    cell = Cell("random_drop", 4)
    folder = _cell_folder(root, cell, None, ckpts=("last.ckpt", "interrupted.ckpt"))
    os.utime(folder / "checkpoints" / "last.ckpt", (1_000, 1_000))
    os.utime(folder / "checkpoints" / "interrupted.ckpt", (2_000, 2_000))
    step = plan_cell(cell, EXP, str(root), SCHEDULE, [])
    assert step.commands[0] == ["fit", "--config", f"{folder}/config.yaml", "--ckpt_path", f"{folder}/checkpoints/interrupted.ckpt"]
    assert step.commands[1] == ["test", "--config", f"{folder}/config.yaml"]  # then the run's model, not interrupted.ckpt


def test_a_finished_fit_without_test_results_is_only_tested(root):
    cell = Cell("mean_pool", 4)
    folder = _cell_folder(root, cell, _metrics("mean_pool", 4, 0.5, 0.5, 0.6, test=False))
    step = plan_cell(cell, EXP, str(root), SCHEDULE, [])
    assert step.state == "test" and step.commands == [
        ["test", "--config", f"{folder}/config.yaml"]]


def test_folders_compare_cannot_continue_are_refused_before_anything_runs(root):
    broken = _cell_folder(root, Cell("merge", 4), None, ckpts=())  # config.yaml, no checkpoint, no test
    with pytest.raises(KTMError, match=r"without test results, config.yaml and a checkpoint .* -> move it away \(e.g. mv "):
        plan_cell(Cell("merge", 4), EXP, str(root), SCHEDULE, [])
    shutil.rmtree(broken)
    _cell_folder(root, Cell("merge", 4), _metrics("truncate_tail", 4, 0.5, 0.5, 0.6))
    with pytest.raises(KTMError, match="holds a model.compressor=truncate_tail run, not merge"):
        plan_cell(Cell("merge", 4), EXP, str(root), SCHEDULE, [])


def test_run_plan_runs_each_command_in_order_and_stops_at_the_first_failure(root):
    _cell_folder(root, Cell("none", 1), _metrics("none", 1, 0, 0, 0))
    steps = [plan_cell(c, EXP, str(root), SCHEDULE, []) for c in plan_cells(["none", "merge", "truncate_tail"], [4])]
    ran: list[list[str]] = []
    run_plan(steps, runner=lambda command: ran.append(command) or 0)
    assert [c[:1] + c[4:5] for c in ran if c[0] == "fit"] == [["fit", "cmp_merge_k4"], ["fit", "cmp_truncate_tail_k4"]]
    assert [c[0] for c in ran] == ["fit", "test", "fit", "test"]  # the reused `none` cell runs nothing
    ran.clear()
    with pytest.raises(KTMError, match=r"cell cmp_merge_k4 failed: `ktm test --config .*` exited with 1 -> see its output"):
        run_plan(steps, runner=lambda command: ran.append(command) or (1 if command[0] == "test" else 0))
    assert len(ran) == 2
    with pytest.raises(Interrupted) as stopped:
        run_plan(steps, runner=lambda command: 130)
    assert stopped.value.code == 130


# -- the report -----------------------------------------------------------------------------------------

CELLS = {Cell("none", 1): (0.875, 0.875, 0.0), Cell("merge", 4): (0.75, 0.75, 0.75), Cell("truncate_tail", 4): (0.5, 0.5, 0.6),
         Cell("mean_pool", 4): (0.625, 0.5, 0.625)}


@pytest.fixture
def finished(root) -> Path:
    for cell, (acc, bal, f1) in CELLS.items():
        _cell_folder(root, cell, _metrics(cell.compressor, cell.k, acc, bal, f1))
    return root


def test_report_and_pareto_plot_from_finished_cells(finished, capsys):
    code = cli_main(["compare", "--exp", EXP, "--root", str(finished), "--compressors", "merge", "none", "truncate_tail",
                     "mean_pool", "--trainer.max_epochs=1"])
    assert code == 0
    out_dir = finished / "compare" / EXP
    results = json.loads((out_dir / "results.json").read_text())
    assert [(c["compressor"], c["k"]) for c in results["cells"]] == [(c.compressor, c.k) for c in CELLS]
    merge = results["cells"][1]
    assert (merge["accuracy"], merge["balanced_accuracy"], merge["majority_baseline"], merge["compression"], merge["pl_f1"]) == (
        0.75, 0.75, 0.625, 0.75, 0.75)
    gain = results["merge_gain"]["4"]
    assert (gain["baseline"], gain["baseline_pl_f1"]) == ("mean_pool", 0.625) and gain["relative"] == pytest.approx(0.2)
    md = (out_dir / "results.md").read_text()
    assert "| method | K | accuracy | balanced acc. | majority baseline | compression L | P-L F1 | steps | run |" in md
    assert f"| none | 1 | 0.875 | 0.875 | 0.625 | 0.000 | 0.000 | 100 | `{EXP}/cmp_none_k1` |" in md
    assert f"| truncate_tail | 4 | 0.500 | 0.500 | 0.625 | 0.750 | 0.600 | 100 | `{EXP}/cmp_truncate_tail_k4` |" in md
    assert f"ktm compare --exp {EXP} --root {finished} --compressors merge none truncate_tail mean_pool --trainer.max_epochs=1" in md
    assert results["cells"][0]["fit_seconds"] == 10.0
    assert "| 4 | 0.750 | `mean_pool` | 0.625 | +20.0% |" in md
    assert "The merge trained on the experiment's K curriculum, each baseline at its K alone." in md
    png = (out_dir / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out_dir / "pareto.png.sha256").is_file()  # written like every artefact: atomic, checksummed
    out = capsys.readouterr().out
    assert out.count(": reuse (its metrics.json has test results at K=") == 4 and "ktm compare: [" not in out  # nothing ran


def test_extra_runs_are_rows_of_their_own_with_their_own_gain(finished, capsys):
    extra = finished / EXP / "read_init_s0"  # a merge started elsewhere (e.g. --model.init_from), not trained by compare
    extra.mkdir(parents=True)
    write_json(extra / "metrics.json", _metrics("merge", 4, 0.8125, 0.8, 0.8))
    code = cli_main(["compare", "--exp", EXP, "--root", str(finished), "--compressors", "merge", "none", "truncate_tail",
                     "mean_pool", "--extra", "read_init_s0"])
    assert code == 0
    results = json.loads((finished / "compare" / EXP / "results.json").read_text())
    row = results["cells"][-1]
    assert (row["compressor"], row["method"], row["k"], row["balanced_accuracy"], row["extra"]) == (
        "merge (read_init_s0)", "merge", 4, 0.8, True)
    gains = results["merge_gain"]
    assert gains["4"]["relative"] == pytest.approx(0.2)  # the merge cell's gain is unchanged by the extra row
    extra_gain = gains["4 merge (read_init_s0)"]
    assert extra_gain["baseline"] == "mean_pool" and extra_gain["relative"] == pytest.approx(0.8 / 0.625 - 1)
    md = (finished / "compare" / EXP / "results.md").read_text()
    assert f"| merge (read_init_s0) | 4 | 0.812 | 0.800 | 0.625 | 0.750 | 0.800 | 100 | `{EXP}/read_init_s0` |" in md
    assert "| 4 | 0.800 (merge (read_init_s0)) | `mean_pool` | 0.625 | +28.0% |" in md
    assert "ktm compare: [" not in capsys.readouterr().out  # nothing ran: the extra run is read, not trained


@pytest.mark.parametrize("doc, message", [
    (None, "has no metrics.json -> finish it first (ktm fit, then ktm test), or drop other from --extra"),
    (_metrics("merge", 4, 0.5, 0.5, 0.6, test=False), "has no test results at K=4 -> run ktm test --config "),
])
def test_an_extra_run_that_cannot_be_read_is_one_line_before_anything_runs(root, doc, message, capsys):
    folder = root / EXP / "other"
    folder.mkdir(parents=True)
    if doc is not None:
        write_json(folder / "metrics.json", doc)
    assert cli_main(["compare", "--exp", EXP, "--root", str(root), "--compressors", "merge", "--extra", "other"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (root / EXP / "cmp_merge_k4").exists()  # refused before any cell was planned into a folder


def test_perplexity_cells_use_ppl1_over_ppl(tmp_path):
    def doc(compressor, k, ppl, performance, f1):
        row = {"perplexity": ppl, "perplexity_uncompressed": 1.2, "performance": performance, "compression": 0.0 if k == 1 else 0.5,
               "pl_f1": f1, "examples": 50.0}
        return {"data": {"benchmark": "commitpack", "task": "perplexity"}, "model": {"compressor": compressor},
                "global_step": 10, "test": {f"k{k}": row}}

    root = tmp_path / "ck"
    cells = [Cell("none", 1), Cell("merge", 2), Cell("truncate_head", 2)]
    for cell, values in zip(cells, [(1.2, 1.0, 0.0), (1.5, 0.8, 0.615), (2.4, 0.5, 0.5)]):
        write_json(root / EXP / cell.run / "metrics.json", doc(cell.compressor, cell.k, *values))
    results = collect(EXP, str(root), cells)
    assert results["task"] == "perplexity" and results["merge_gain"]["2"]["relative"] == pytest.approx(0.23)
    write_outputs(results, tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| method | K | perplexity | uncompressed (K=1) | P = ppl1/ppl | compression L | P-L F1 | steps | run |" in md
    assert "| truncate_head | 2 | 2.400 | 1.200 | 0.500 | 0.500 | 0.500 |" in md and "P = ppl(K=1) / ppl of the same run" in md
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_dry_run_prints_the_plan_and_runs_nothing(root, capsys):
    _cell_folder(root, Cell("merge", 4), _metrics("merge", 4, 0.5, 0.5, 0.6, test=False, fitted=False))
    assert cli_main(["compare", "--exp", EXP, "--root", str(root), "--compressors", "merge", "truncate_tail", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "ktm compare: cmp_merge_k4: resume (half-finished: resumes from last.ckpt)" in out
    assert "ktm compare: cmp_truncate_tail_k4: fit (no run yet)" in out
    assert (f"ktm fit --exp {EXP} --run cmp_truncate_tail_k4 --root {root} --model.compressor=truncate_tail "
            "'--model.ks=[1,4]' '--data.k_schedule=[4]'") in out  # quoted for the shell: [..] is a glob
    assert f"ktm fit --config {root}/{EXP}/cmp_merge_k4/config.yaml --ckpt_path {root}/{EXP}/cmp_merge_k4/checkpoints/last.ckpt" in out
    assert not (root / EXP / "cmp_truncate_tail_k4").exists() and not (root / "compare").exists()


# -- bad input: one line naming the problem and the fix ----------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--compressors", "merge", "zip"], "unknown compressor 'zip' in --compressors -> use any of: merge, mean_pool, none, "),
    (["--ks", "four"], "K must be a whole number >= 1, got 'four' in --ks -> pass e.g. --ks 2 4"),
    (["--ks", "0"], "K must be a whole number >= 1, got '0' in --ks"),
    (["--model.ks=[1,4]"], "--model.ks is set by ktm compare for each cell -> drop it: use --ks"),
    (["--run", "mine"], "--run is set by ktm compare for each cell"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert cli_main(["compare", "--exp", EXP, "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ktm: error: {message}") and err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    ([], f"ktm: error: ktm compare needs --exp NAME -> use one of: {EXP}"),
    (["--exp", "nope"], f"ktm: error: unknown experiment 'nope' -> use one of: {EXP}"),
])
def test_a_missing_experiment_is_one_line(argv, message, capsys):
    assert cli_main(["compare", *argv, "--dry-run"]) == 2
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_compare_passes_its_variables():
    def dry(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "compare", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "/ktm " in line]

    assert dry("PRESET=") == [".venv/bin/ktm compare --exp tree_k4  "]  # K=4 by default: ktm compare's own, not the sweep's K
    assert dry("EXP=amazon_k4", "COMPRESSORS=merge none", "K=2 4", "ARGS=--trainer.max_epochs=1", "PRESET=") == [
        ".venv/bin/ktm compare --exp amazon_k4 --compressors merge none --ks 2 4  --trainer.max_epochs=1"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("exp, preset", [
    ("tree_k4", "--model.keep_marked=true --trainer.max_steps=200 --trainer.max_time=null"),
    ("amazon_k4", "--trainer.max_steps=174 --trainer.max_time=null --data.max_test_examples=600"),
    ("commitpack_k2", "")])  # no preset: the experiment's own budget
def test_make_compare_puts_the_experiments_cpu_preset_before_args(exp, preset):
    out = subprocess.run(["make", "-n", "-B", "compare", f"EXP={exp}", "ARGS=--trainer.max_steps=10"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert [line for line in out.splitlines() if "/ktm " in line] == [f".venv/bin/ktm compare --exp {exp} {preset} --trainer.max_steps=10"]
