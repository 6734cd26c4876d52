"""`ktm report`: one run's table (unchanged) and the mean ± std over the seeded runs of an experiment folder,
beside the K=1 LoRA trained alone (`make reference`), from metrics.json files written here."""

from __future__ import annotations

import json
import math

import pytest

from ktm.cli import main as cli_main
from ktm.io import verify, write_json
from ktm.report import REFERENCE_TITLE, main, render


def _classification(acc4: float, bal4: float, acc1: float = 0.5, bal1: float = 0.5) -> dict:
    def row(acc, bal, compression, examples):
        return {"accuracy": acc, "balanced_accuracy": bal, "majority_baseline": 0.625, "compression": compression,
                "pl_f1": 2 * acc * compression / (acc + compression) if compression else 0.0, "examples": examples}

    return {"data": {"benchmark": "tree", "task": "classification", "stage": "small", "source": "generated"},
            "global_step": 100, "wall_seconds": {"fit": 10.0, "test": 2.0},
            "test": {"k1": row(acc1, bal1, 0.0, 600.0), "k4": row(acc4, bal4, 0.75, 600.0)},
            "val": {"k1": row(acc1, bal1, 0.0, 300.0), "k4": row(acc4, bal4, 0.75, 300.0)}}


def _k1_only(acc: float, bal: float) -> dict:
    doc = _classification(acc, bal, acc, bal)
    for split in ("test", "val"):
        del doc[split]["k4"]
    return doc


@pytest.fixture
def experiment(tmp_path):
    """checkpoints/tree_k4 with three seeded runs, a plain `default` run and a two-seed K=1 reference."""
    folder = tmp_path / "tree_k4"
    runs = {"default_s0": _classification(0.25, 0.5), "default_s1": _classification(0.5, 0.75),
            "default_s2": _classification(0.75, 1.0), "default": _classification(0.875, 0.875),
            "k1ref_s0": _k1_only(0.875, 0.75), "k1ref_s1": _k1_only(0.625, 0.5)}
    for name, doc in runs.items():
        write_json(folder / name / "metrics.json", doc)  # as RunOutputs writes it: atomic, with a checksum
    (folder / "not_a_run").mkdir()  # e.g. a run killed before its first metrics.json
    return folder


def _summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())["groups"]


def test_mean_and_sample_std_over_seeds(experiment, capsys):
    main([str(experiment)])
    out = capsys.readouterr().out
    group = _summary(experiment)["default_s*"]
    assert group["runs"] == ["default_s0", "default_s1", "default_s2"] and group["seeds"] == [0, 1, 2]
    bal = group["splits"]["test"]["k4"]["balanced_accuracy"]
    assert (bal["mean"], bal["std"], bal["n"]) == (0.75, 0.25, 3)  # sqrt((0.25² + 0 + 0.25²) / 2)
    assert bal["values"] == {"default_s0": 0.5, "default_s1": 0.75, "default_s2": 1.0}
    acc = group["splits"]["val"]["k4"]["accuracy"]
    assert (acc["mean"], acc["std"]) == (0.5, 0.25)
    assert group["splits"]["test"]["k4"]["majority_baseline"]["std"] == 0.0
    assert "| test | 4 | 3 | 0.500 ± 0.250 (0.250, 0.500, 0.750) | 0.750 ± 0.250 (0.500, 0.750, 1.000) | 0.625 ± 0.000 " in out
    f1 = [2 * a * 0.75 / (a + 0.75) for a in (0.25, 0.5, 0.75)]
    mean = sum(f1) / 3
    assert group["splits"]["test"]["k4"]["pl_f1"]["mean"] == pytest.approx(mean, abs=1e-15)
    assert group["splits"]["test"]["k4"]["pl_f1"]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in f1) / 2), abs=1e-15)


def test_the_k1_reference_sits_under_the_merged_k(experiment, capsys):
    main([str(experiment)])
    out = capsys.readouterr().out
    groups = _summary(experiment)
    assert groups["default_s*"]["reference"] == "k1ref_s*" and groups["k1ref_s*"]["reference"] is None
    ref = groups["k1ref_s*"]["splits"]["test"]["k1"]["balanced_accuracy"]
    assert (ref["mean"], ref["n"]) == (0.625, 2) and ref["std"] == math.sqrt(0.03125)
    lines = out.splitlines()
    merged = lines.index(next(line for line in lines if line.startswith("| test | 4 | 3 |")))
    assert lines[merged + 1].startswith("| test | *reference K=1* | 2 | 0.750 ± 0.177 (0.875, 0.625) | 0.625 ± 0.177 (0.750, 0.500) |")
    assert f"*reference K=1*: {REFERENCE_TITLE}, `k1ref_s*`" in out
    # the plain `default` run is its own group (n=1, no ±), still beside the only reference there is
    assert groups["default"]["reference"] == "k1ref_s*"
    assert "| test | 4 | 1 | 0.875 | 0.875 | 0.625 |" in out


def test_the_gap_to_the_reference_is_computed_per_seed_and_for_the_means(experiment, capsys):
    main([str(experiment)])
    out = capsys.readouterr().out
    groups = _summary(experiment)
    # test K=4 balanced: default_s0..s2 0.5, 0.75, 1.0; k1ref_s0, s1 0.75, 0.5 (mean 0.625)
    # the means over the paired seeds 0 and 1 only: 0.625 against 0.625
    gap = groups["default_s*"]["reference_gap"]["test"]["k4"]
    assert gap["mean"] == pytest.approx(0.0) and gap["by_seed"] == {"0": pytest.approx(-25.0), "1": pytest.approx(25.0)}
    assert "- test, points of balanced accuracy, K minus the reference: K=4 **+0.0** (s0 -25.0, s1 +25.0)" in out
    # a plain run has no seed to pair: the gap of the means only; the reference itself has none
    assert groups["default"]["reference_gap"]["val"]["k4"] == {"mean": pytest.approx(25.0), "by_seed": {}}
    assert "- val, points of balanced accuracy, K minus the reference: K=4 **+25.0**\n" in out
    assert "reference_gap" not in groups["k1ref_s*"]


def test_a_perplexity_gap_is_the_ratio_to_the_reference(tmp_path, capsys):
    for name, rows in (("default_s0", {"k1": 1.5, "k2": 2.0}), ("default_s1", {"k1": 3.0, "k2": 4.0}),
                       ("k1ref_s0", {"k1": 1.0}), ("k1ref_s1", {"k1": 2.0})):
        write_json(tmp_path / "commitpack_k2" / name / "metrics.json", {"data": {"benchmark": "commitpack", "task": "perplexity"},
                   "test": {k: {"perplexity": v, "performance": rows["k1"] / v, "pl_f1": 0.0, "examples": 12.0} for k, v in rows.items()}})
    main([str(tmp_path / "commitpack_k2")])
    out = capsys.readouterr().out
    assert "- test, perplexity, K over the reference: K=2 **2.000x** (s0 2.000x, s1 2.000x)" in out
    assert set(_summary(tmp_path / "commitpack_k2")["default_s*"]["reference_gap"]["test"]) == {"k2"}  # K=1 is no merged K


def test_summary_files_are_written_atomically_with_checksums(experiment, capsys):
    main([str(experiment)])
    out = capsys.readouterr().out
    verify(experiment / "summary.md", "summary")
    verify(experiment / "summary.json", "summary")
    assert (experiment / "summary.md").read_text() == out
    assert set(_summary(experiment)) == {"default", "default_s*", "k1ref_s*"}


def test_several_run_folders_are_aggregated_without_touching_the_summary(experiment, capsys):
    main([str(experiment / "default_s0"), str(experiment / "default_s2")])
    out = capsys.readouterr().out
    assert "| test | 4 | 2 | 0.500 ± 0.354 (0.250, 0.750) |" in out and REFERENCE_TITLE not in out
    assert not (experiment / "summary.md").exists()


def test_one_run_keeps_its_table(experiment, capsys):
    run = experiment / "default_s1"
    main([str(run)])
    out = capsys.readouterr().out
    expected = render(json.loads((run / "metrics.json").read_text()), title="tree_k4/default_s1")
    assert out == expected + "\n\n" and (run / "results.md").read_text() == expected + "\n"
    assert "| test | 4 | 600 | 0.500 | 0.750 | 0.625 | 0.750 | 0.600 |" in out and "±" not in out
    assert not (experiment / "summary.md").exists()


def test_perplexity_runs_report_perplexity_p_and_f1(tmp_path, capsys):
    for seed, ppl in ((0, 2.0), (1, 4.0)):
        rows = {"k1": {"perplexity": 1.0, "performance": 1.0, "pl_f1": 0.0, "compression": 0.0, "examples": 12.0},
                "k2": {"perplexity": ppl, "performance": 1.0 / ppl, "pl_f1": 0.5, "compression": 0.5, "examples": 12.0}}
        write_json(tmp_path / "commitpack_k2" / f"default_s{seed}" / "metrics.json",
                   {"data": {"benchmark": "commitpack", "task": "perplexity"}, "test": rows})
    main([str(tmp_path / "commitpack_k2")])
    out = capsys.readouterr().out
    assert "| split | K | n | perplexity | P = ppl1/ppl | P-L F1 |" in out
    assert "| test | 2 | 2 | 3.000 ± 1.414 (2.000, 4.000) | 0.375 ± 0.177 (0.500, 0.250) | 0.500 ± 0.000 (0.500, 0.500) |" in out


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: (p / "run" / "checkpoints").mkdir(parents=True), lambda p: None])
def test_a_folder_without_runs_is_one_line(make, tmp_path, capsys):
    folder = tmp_path / "tree_k4"
    make(folder)
    assert cli_main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ktm: error: {folder} ")
    assert "does not exist" in err[0] if not folder.exists() else "holds no runs" in err[0]
    assert "experiment folder (checkpoints/<exp>)" in err[0]


def test_runs_moved_aside_by_overwrite_are_not_in_the_summary(tmp_path):
    from ktm.report import runs_in

    for name in ("default", "default.old-20261201-120000"):
        write_json(tmp_path / name / "metrics.json", _classification(0.8, 0.8))
    assert [p.name for p in runs_in(tmp_path)] == ["default"]


def test_a_budget_run_shows_how_far_its_layouts_left_the_fixed_k():
    rows = {"k1": {"accuracy": 0.9, "examples": 10.0, "merged_tokens_mean": 24.0, "adapted_share": 0.0},
            "k4": {"accuracy": 0.8, "examples": 10.0, "merged_tokens_mean": 6.0, "adapted_share": 0.25}}
    doc = {"data": {"benchmark": "amazon", "task": "classification"}, "test": rows, "val": rows}
    out = render(doc)
    assert out.count("| positions read | tokens off the fixed K |") == 2  # once per split, not repeated
    assert "| test | 4 | 10 | 0.800 | - | - | - | - | 6.000 | 0.250 |" in out
    fixed = {k: {**m, "adapted_share": 0.0} for k, m in rows.items()}
    assert "tokens off the fixed K" not in render({**doc, "test": fixed, "val": fixed})


def test_runs_of_two_machines_are_named_beside_their_figures(experiment, capsys):
    """Last session compared Xeon runs with EPYC runs unawares: the summary says so where a group or its reference
    spans two machines (from metrics.json environment), and nothing where one machine or none is recorded."""
    from ktm.io import read_json

    def on(run: str, cpu: str) -> None:
        doc = read_json(experiment / run / "metrics.json", "metrics file")
        write_json(experiment / run / "metrics.json", {**doc, "environment": {"fit": {"cpu": cpu, "cuda_devices": []}}})

    main([str(experiment)])
    assert "machines differ" not in capsys.readouterr().out  # nothing recorded: nothing said
    for run in ("default_s0", "default_s1", "default_s2", "k1ref_s0"):
        on(run, "Intel Xeon")
    main([str(experiment)])
    assert "machines differ" not in capsys.readouterr().out  # one machine (k1ref_s1 unrecorded)
    on("k1ref_s1", "AMD EPYC")
    main([str(experiment)])
    out = capsys.readouterr().out
    assert out.count("*machines differ* (Intel Xeon: default_s0, default_s1, default_s2, k1ref_s0; AMD EPYC: k1ref_s1)") == 1
    assert out.count("*machines differ* (Intel Xeon: k1ref_s0; AMD EPYC: k1ref_s1)") == 2  # the plain default's, the reference's
    assert _summary(experiment)["k1ref_s*"]["machines"] == {"k1ref_s0": "Intel Xeon", "k1ref_s1": "AMD EPYC"}


@pytest.mark.parametrize("evaluated, selected, line", [
    ({"test": "last.ckpt"}, None, None),                       # the run's model: no line
    ({"test": "epoch=1-step=50.ckpt"}, None, "test: of epoch=1-step=50.ckpt, not the run's model (last.ckpt)"),
    ({"test": "best.ckpt"}, "best.ckpt", None),
    ({"test": "last.ckpt"}, "best.ckpt", "test: of last.ckpt, not the run's model (best.ckpt)"),
    ({}, "best.ckpt", None),                                   # recorded before ktm wrote `evaluated`
])
def test_numbers_of_another_checkpoint_than_the_runs_model_say_so(evaluated, selected, line):
    doc = {**_classification(0.9, 0.9, 0.8, 0.8), "evaluated": evaluated}
    if selected:
        doc["selected"] = {"step": 50, "final_step": 100, "monitor": "val/k4/balanced_accuracy", "value": 0.8, "checkpoint": selected}
    out = render(doc)
    assert (line in out) if line else ("not the run's model" not in out)


def test_a_run_with_roc_auc_shows_it_beside_balanced_accuracy():
    """Runs since 2026-12-07 write the ROC AUC of the label scores; older metrics.json files keep their table."""
    doc = _classification(0.75, 0.7)
    assert "ROC AUC" not in render(doc)
    doc["test"]["k4"]["auroc"] = 0.768
    lines = render(doc).splitlines()
    header = next(line for line in lines if line.startswith("| split | K |"))
    assert header.startswith("| split | K | examples | accuracy | balanced acc. | majority baseline | ROC AUC |")
    assert "| test | 4 | 600 | 0.750 | 0.700 | 0.625 | 0.768 |" in " ".join(lines)
    assert "| test | 1 | 600 | 0.500 | 0.500 | 0.625 | - |" in " ".join(lines)


@pytest.mark.parametrize("stop, shown", [
    (None, "global step 100, wall"),                                         # recorded before 2026-12-08
    ({"by": "max_steps", "planned_steps": 100}, "global step 100 (ended by max_steps), wall"),
    ({"by": "max_time", "planned_steps": 160}, "global step 100 (**cut by trainer.max_time** short of 160 planned steps), wall"),
])
def test_a_run_says_what_ended_its_fit(stop, shown):
    doc = {**_classification(0.9, 0.9), **({"stop": stop} if stop else {})}
    assert shown in render(doc)


def test_a_summary_names_the_runs_the_wall_clock_cap_cut_short(experiment, capsys):
    """A seed that ran out of time trained less than its peers: the summary says which, beside its figures."""
    from ktm.io import read_json

    def stopped(run: str, by: str, step: int) -> None:
        doc = read_json(experiment / run / "metrics.json", "metrics file")
        write_json(experiment / run / "metrics.json", {**doc, "global_step": step, "stop": {"by": by, "planned_steps": 160}})

    stopped("default_s0", "max_steps", 160)
    main([str(experiment)])
    assert "cut by trainer.max_time" not in capsys.readouterr().out
    stopped("default_s2", "max_time", 90)
    stopped("k1ref_s1", "max_time", 120)
    main([str(experiment)])
    out = capsys.readouterr().out
    assert out.count("*cut by trainer.max_time* (default_s2 (step 90 of 160); k1ref_s1 (step 120 of 160))") == 1
    assert out.count("*cut by trainer.max_time* (k1ref_s1 (step 120 of 160))") == 2  # the plain default's, the reference's
    assert _summary(experiment)["default_s*"]["cut_by_time"]["default_s2"] == "step 90 of 160"


@pytest.mark.parametrize("fit, machine", [
    ({"cpu": "AMD EPYC", "cuda_devices": []}, "AMD EPYC"),                                   # flags not recorded
    ({"cpu": "AMD EPYC", "avx512_bf16": True, "amx_bf16": False}, "AMD EPYC (AVX512-BF16)"),
    ({"cpu": "AMD EPYC", "avx512_bf16": False, "amx_bf16": False}, "AMD EPYC (no native bf16)"),
    ({"cpu": "Intel Xeon", "avx512_bf16": True, "amx_bf16": True, "cuda_devices": ["H100"]}, "Intel Xeon (AVX512-BF16, AMX) + H100"),
    ({}, None),
])
def test_a_machine_is_named_with_its_native_bf16(fit, machine):
    """2026-12-08: two AMD EPYC kinds, one with AVX512-BF16 (bf16-mixed) and one AVX2-only (float32), one name."""
    from ktm.report import machine_of

    assert machine_of({"environment": {"fit": fit}}) == machine
