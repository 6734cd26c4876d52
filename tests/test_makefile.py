"""The Makefile's commands (`make -n`: printed, not run): pinned installs, seeded runs and the K=1 reference."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _dry(*args: str) -> list[str]:
    out = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def _ktm(lines: list[str]) -> list[str]:
    """The commands that run, without make train's preflight (`--check`, test_every_fit_is_checked_before_any_runs)."""
    return [line for line in lines if "/ktm " in line and "--check" not in line]


def _fits(line: str) -> list[str]:
    """The `ktm fit` commands of one shell line, each without its --check and spacing."""
    parts = [" ".join(p.replace("--check", "").replace("|| exit 1; done", "").split()) for p in line.split(" && ")]
    return [p[p.index("ktm fit"):] for p in parts if "ktm fit" in p]


def test_install_uses_the_constraints():
    pip = [line for line in _dry("install") if "pip install" in line]
    assert len(pip) == 2 and all("-c constraints.txt" in line for line in pip)
    assert '-c constraints.txt -e ".[test]" "torch==2.13.0"' in pip[1]


@pytest.mark.parametrize("exp, task_read", [("tree_k4", "read_tree_k4"), ("amazon_k4", "read_amazon_k4"), ("rt_k4", "read_rt_k4"),
                                            ("commitpack_k2", "read_commitpack_k2"), ("commitpack_k4", "read_commitpack_k4")])
def test_train_without_seeds_reads_twice_then_trains_one_run(exp, task_read):
    """tree_k4 (the default), the sentiment and the code tasks: the shared reading checkpoint, then the task's own text
    read at the task's K (TASK_READ), then the task (docs/results.md: higher K=4 in every seed of the tree and Amazon,
    lower K=2 and K=4 perplexity on CommitPackFT)."""
    assert _ktm(_dry("train", f"EXP={exp}", "POSITIONS=compact")) == [
        ".venv/bin/ktm fit --exp read_k1248 --run default --reuse",
        f".venv/bin/ktm fit --exp {task_read} --run default --reuse  --model.init_from=checkpoints/read_k1248/default/export && true",
        f".venv/bin/ktm fit --exp {exp} --run default --model.init_from=checkpoints/{task_read}/default/export ",
        f".venv/bin/ktm test --config checkpoints/{exp}/default/config.yaml"]  # the run's model: best.ckpt or last.ckpt
    assert task_read not in " ".join(_ktm(_dry("train", f"EXP={exp}", "TASK_READ=")))
    assert _dry("train") == _dry("train", "EXP=tree_k4")  # tree_k4 is make train's experiment


def test_the_task_reading_stage_runs_once_per_seed_on_that_seeds_data():
    """Its text is the seed's training split, so one seed's reading run is never another's start."""
    (loop,) = [line for line in _ktm(_dry("train", "SEEDS=0 1", "RUN=r")) if line.startswith("for s")]
    loop = " ".join(loop.split())
    read = ("for s in 0 1; do .venv/bin/ktm fit --exp read_tree_k4 --run seed${s} --reuse --seed_everything=$s --data.seed=$s "
            "--model.init_from=checkpoints/read_k1248/default/export && .venv/bin/ktm fit --exp tree_k4 --run r_s$s "
            "--model.init_from=checkpoints/read_tree_k4/seed${s}/export --seed_everything=$s --data.seed=$s &&")
    assert loop.startswith(read)


def test_task_read_args_go_to_the_reading_stage_only_and_its_tag_names_its_runs():
    """The one-checkpoint recipe with K=8 (docs/results.md) reads the tree's text with an encoder for K=8 too:
    TASK_READ_ARGS reach that fit alone, TASK_READ_TAG keeps its runs apart from the plain recipe's."""
    lines = _ktm(_dry("train", "SEEDS=0", "RUN=every_k8", "TASK_READ_ARGS=--model.ks=[1,2,4,8]", "TASK_READ_TAG=_k1248",
                      "ARGS=--data.seed=9"))
    loop = " ".join(lines[1].split())
    read, task = loop.split(" && ")[:2]
    assert read.endswith("--run seed${s}_k1248 --reuse --seed_everything=$s --data.seed=$s "
                         "--model.init_from=checkpoints/read_k1248/default/export --model.ks=[1,2,4,8]")
    assert "--model.ks" not in task and task.endswith("--data.seed=9")
    assert "--model.init_from=checkpoints/read_tree_k4/seed${s}_k1248/export" in task
    single = _ktm(_dry("train", "TASK_READ_ARGS=--model.ks=[1,2,4,8]", "TASK_READ_TAG=_k1248"))
    assert "--run default_k1248 --reuse" in single[1] and single[1].endswith("--model.ks=[1,2,4,8] && true")
    assert "--model.init_from=checkpoints/read_tree_k4/default_k1248/export" in single[2]


def test_the_one_checkpoint_experiment_reads_the_trees_text_with_every_k_encoder():
    """tree_k1248 starts as tree_k4, its task reading stage with K=8 too (run names tagged apart from tree_k4's)."""
    lines = _ktm(_dry("train", "EXP=tree_k1248"))
    assert lines[1] == (".venv/bin/ktm fit --exp read_tree_k4 --run default_k1248 --reuse  "
                        "--model.init_from=checkpoints/read_k1248/default/export '--model.ks=[1,2,4,8]' && true")
    assert lines[2].startswith(".venv/bin/ktm fit --exp tree_k1248 --run default "
                               "--model.init_from=checkpoints/read_tree_k4/default_k1248/export")
    assert "--model.ks" not in lines[2]
    assert "--run default --reuse  --model.init_from" in _ktm(_dry("train", "EXP=tree_k1248", "TASK_READ_ARGS=", "TASK_READ_TAG="))[1]


def test_spread_positions_go_to_every_stage_and_name_the_reading_runs_apart():
    """A stage learns the layout it reads (docs/results.md: spread only at the task gives nothing), so POSITIONS=spread
    reaches the reading, the task's reading and the task, and the reading runs are not the compact chain's."""
    lines = _ktm(_dry("train", "EXP=commitpack_k4", "POSITIONS=spread"))
    assert lines[0] == ".venv/bin/ktm fit --exp read_k1248 --run default_spread --reuse --model.merged_positions=spread"
    assert lines[1] == (".venv/bin/ktm fit --exp read_commitpack_k4 --run default_spread --reuse  --model.init_from="
                        "checkpoints/read_k1248/default_spread/export --model.merged_positions=spread && true")
    assert lines[2] == (".venv/bin/ktm fit --exp commitpack_k4 --run default --model.init_from="
                        "checkpoints/read_commitpack_k4/default_spread/export --model.merged_positions=spread ")
    (loop,) = [" ".join(line.split()) for line in _ktm(_dry("train", "EXP=commitpack_k4", "POSITIONS=spread", "SEEDS=1"))
               if line.startswith("for s")]
    read, task = loop.split(" && ")[:2]
    assert "--run seed${s}_spread --reuse" in read and read.endswith("--model.merged_positions=spread")
    assert "--model.init_from=checkpoints/read_commitpack_k4/seed${s}_spread/export" in task
    assert task.endswith("--model.merged_positions=spread")
    assert _dry("train", "POSITIONS=compact") == _dry("train")  # compact is the paper's layout and the default,
    for exp in ("EXP=commitpack_k2", "EXP=commitpack_k4"):  # but code's
        assert _dry("train", exp) == _dry("train", exp, "POSITIONS=spread")


def test_an_unknown_layout_is_one_line_before_anything_runs():
    out = subprocess.run(["make", "-n", "train", "POSITIONS=wide"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "/ktm " not in out.stdout  # nothing ran, or was about to
    assert "POSITIONS=wide is not a layout: use POSITIONS=compact or POSITIONS=spread" in out.stderr


@pytest.mark.parametrize("args", [("READ=",), ("EXP=tree",)])
def test_train_from_scratch_when_read_is_empty_or_the_experiment_has_no_default(args):
    lines = _ktm(_dry("train", *args))
    assert len(lines) == 2 and "init_from" not in lines[0] and "read_k" not in " ".join(lines)


def test_train_with_seeds_runs_each_into_its_folder():
    (loop, report) = _ktm(_dry("train", "SEEDS=0 1 2", "RUN=r", "READ=", "ARGS=--model.ks=[1,4]"))
    assert loop.startswith("for s in 0 1 2; do ") and loop.endswith("|| exit 1; done")
    assert ".venv/bin/ktm fit --exp tree_k4 --run r_s$s  --seed_everything=$s --data.seed=$s --model.ks=[1,4] &&" in loop
    assert "&& .venv/bin/ktm test --config checkpoints/tree_k4/r_s$s/config.yaml ||" in loop
    assert report == ".venv/bin/ktm report checkpoints/tree_k4"


@pytest.mark.parametrize("seeds, run", [("", "k1ref"), ("SEEDS=5", "k1ref_s$s")])
def test_reference_trains_k1_alone_with_the_same_budget(seeds, run):
    lines = _ktm(_dry("reference", "EXP=tree", *([seeds] if seeds else [])))
    fit = f".venv/bin/ktm fit --exp tree --run {run} --model.ks=[1] --data.k_schedule=[1] --model.lr_encoder=0.0001"
    assert fit in lines[0] and f"--config checkpoints/tree/{run}/config.yaml" in lines[0]
    assert ("--seed_everything=$s --data.seed=$s" in lines[0]) == bool(seeds)
    assert "--trainer" not in lines[0]  # the experiment's own max_time / max_epochs
    assert lines[-1] == ".venv/bin/ktm report checkpoints/tree"
    assert "init_from" not in " ".join(lines)  # tree (the sweeps) has no default reading checkpoint


def test_reference_starts_from_the_reading_checkpoint_of_make_train():
    """The merged tree_k4 runs start from read_k1248: a K=1 reference from scratch would have less budget."""
    lines = _ktm(_dry("reference"))
    assert lines[0] == ".venv/bin/ktm fit --exp read_k1248 --run default --reuse"
    assert lines[1].startswith(".venv/bin/ktm fit --exp read_tree_k4 --run default --reuse")  # the same run as make train's
    assert ("--run k1ref --model.ks=[1] --data.k_schedule=[1] --model.lr_encoder=0.0001 "
            "--model.init_from=checkpoints/read_tree_k4/default/export") in lines[2]
    assert "init_from" not in " ".join(_ktm(_dry("reference", "READ=")))


def test_train_with_read_makes_the_reading_checkpoint_once_then_starts_from_it():
    lines = _ktm(_dry("train", "EXP=tree", "READ=read_k4"))
    made, fit = lines[0], lines[1]
    # made only when no finished run of its config is there (--reuse): a finished reading run is reused by every task run
    # fit only: make train's first run pays the reading fit, not its held-out test as well
    assert made == ".venv/bin/ktm fit --exp read_k4 --run default --reuse"
    assert fit == ".venv/bin/ktm fit --exp tree --run default --model.init_from=checkpoints/read_k4/default/export "
    (loop,) = [line for line in _ktm(_dry("train", "READ=read_k4", "TASK_READ=", "SEEDS=0 1")) if line.startswith("for s")]
    assert "--run default_s$s --model.init_from=checkpoints/read_k4/default/export --seed_everything=$s" in " ".join(loop.split())


@pytest.mark.parametrize("args", [("EXP=amazon_k4",), ("EXP=commitpack_k4", "RUN=r", "ARGS=--trainer.max_epochs=2"), ("READ=",),
                                  ("EXP=tree_k1248", "SEEDS=0 1"), ("EXP=rt_k4", "TASK_READ="),
                                  ("EXP=commitpack_k4", "POSITIONS=spread", "SEEDS=1")])
@pytest.mark.parametrize("target", ["train", "reference"])
def test_every_fit_is_checked_before_any_runs(target, args):
    """make train/reference first gives each fit it will run (READ, TASK_READ, the task; per seed) --check, in one
    shell line with the same arguments: a bad task config or a taken run folder fails before the reading stages."""
    lines = [line for line in _dry(target, *args) if "/ktm " in line]
    (check,) = [line for line in lines if "--check" in line]
    assert lines.index(check) == 0
    checked = _fits(check)
    ran = [fit for line in lines[1:] for fit in _fits(line)]
    assert checked == ran and len(ran) == 3 - ("READ=" in args) * 2 - ("TASK_READ=" in args)
    assert all(part.split()[-1] == "--check" for part in check.replace("|| exit 1; done", "").split(" && ") if "ktm fit" in part)
