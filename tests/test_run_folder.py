"""A run folder belongs to one run (ktm/training/run_folder.py): plain names, one run per folder (resume it,
pick another --run, or --overwrite moves it aside), one process per folder (a lock with the owner's pid),
nothing written before every check passed, and `ktm test` without --ckpt_path never evaluates the untrained
model into a trained run.

The unit tests work on plain folders; the CLI tests either fail before the base loads or use one tiny fit
(the config-built 2-layer Llama) that each mutating test copies first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ktm.training.run_folder as rf
from ktm.cli import main
from ktm.errors import KTMError
from ktm.io import read_json, sha256_file, write_json
from ktm.training.run_folder import LOCK_NAME, RunFolder, check_name, eval_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model.base=config:tiny-llama", "--model.ks=[1,2]", "--data.k_schedule=[1,2]",
        "--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=16", "--data.max_val_examples=8",
        "--data.max_test_examples=8", "--data.batch_size=8", "--data.eval_batch_size=8", "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ktm: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and " -> " in errors[0], err
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_run(folder: Path, *, ckpt: bool = True, export: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("run: r\n")
    if ckpt:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    if export:
        (folder / "export").mkdir()
    return folder


@pytest.fixture
def ktm_log(caplog):
    logger = logging.getLogger("ktm")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="ktm")
    yield caplog
    logger.removeHandler(caplog.handler)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- names --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,why", [
    ("", "is empty"), ("   ", "is empty"), (".", "is not a folder name"), ("..", "is not a folder name"),
    ("a/b", "contains a path separator"), ("../escape", "contains a path separator"),
    ("/tmp/abs", "contains a path separator"), ("a\\b", "contains a path separator"),
    ("a\nb", "contains a control character"), ("a\x00b", "contains a control character"),
    (" lead", "starts or ends with a space"), ("x" * 201, "is longer than 200 bytes"),
])
def test_run_and_experiment_names_are_plain_folder_names(name, why):
    with pytest.raises(KTMError) as exc:
        check_name(name, "--run")
    text = str(exc.value)
    assert f"--run {name!r} {why}: run and experiment names are plain folder names inside --root -> use a name like --run " in text
    assert "\n" not in text


@pytest.mark.parametrize("name", ["default", "k4_s0", "run-1.2", "überlauf", "a b", ".hidden"])
def test_plain_names_pass(name):
    assert check_name(name, "--experiment") == name


# -- one run per folder ---------------------------------------------------------------------------------


def test_fit_into_a_folder_that_holds_a_run_is_refused_with_the_fixes(tmp_path):
    run = fake_run(tmp_path / "tree_k4" / "r")
    before = snapshot(run)
    with pytest.raises(KTMError) as exc:
        RunFolder.claim(tmp_path, "tree_k4", "r")
    text = str(exc.value)
    assert text.startswith(f"run folder {run} already holds a run (config.yaml, checkpoints); a new fit there would mix with it -> ")
    assert f"resume it: ktm fit --config {run / 'config.yaml'} --ckpt_path {run / 'checkpoints' / 'last.ckpt'}" in text
    assert "pick another --run, or add --overwrite to move the old run aside to r.old-<time> (nothing is deleted)" in text
    assert snapshot(run) == before  # no lock left behind either


@pytest.mark.parametrize("marker", ["config.yaml", "checkpoints", "metrics.json", "export"])
def test_each_run_file_marks_a_started_or_finished_run(tmp_path, marker):
    run = tmp_path / "e" / "r"
    run.mkdir(parents=True)
    (run / marker).mkdir() if marker in ("checkpoints", "export") else (run / marker).write_text("{}")
    with pytest.raises(KTMError, match=rf"already holds a run \({marker}\)"):
        RunFolder.claim(tmp_path, "e", "r")
    (run / "events.out.tfevents.1").write_text("")  # TensorBoard files alone are not a run
    (run / marker).rmdir() if marker in ("checkpoints", "export") else (run / marker).unlink()
    RunFolder.claim(tmp_path, "e", "r").release()


def test_resuming_into_its_own_folder_is_allowed_a_checkpoint_of_another_run_is_not(tmp_path):
    run = fake_run(tmp_path / "e" / "r")
    for ckpt in (run / "checkpoints" / "last.ckpt", "last"):
        RunFolder.claim(tmp_path, "e", "r", ckpt_path=str(ckpt)).release()
    other = fake_run(tmp_path / "e" / "other") / "checkpoints" / "last.ckpt"
    with pytest.raises(KTMError, match=rf"already holds a run .* -> to start from {other}, pick another --run, or add --overwrite"):
        RunFolder.claim(tmp_path, "e", "r", ckpt_path=str(other))
    RunFolder.claim(tmp_path, "e", "fresh", ckpt_path=str(other)).release()  # a new run from another's checkpoint


def test_overwrite_moves_the_old_run_aside_when_the_run_begins_and_deletes_nothing(tmp_path, ktm_log):
    run = fake_run(tmp_path / "e" / "r", export=True)
    before = snapshot(run)
    folder = RunFolder.claim(tmp_path, "e", "r", overwrite=True)
    assert snapshot(run).keys() == {*before, LOCK_NAME}  # nothing moved before the run starts
    aside = folder.begin()
    assert aside is not None and aside.parent == run.parent and aside.name.startswith("r.old-")
    assert snapshot(aside) == before  # every file kept, the lock not carried along
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"--overwrite: moved the previous run {run} aside to {aside}" in ktm_log.text
    folder.release()
    assert not (run / LOCK_NAME).exists() and run.is_dir()
    # twice in the same second: a second aside name, never a clash
    fake_run(tmp_path / "e" / "r2")
    first = RunFolder.claim(tmp_path, "e", "r2", overwrite=True)
    first.begin()
    first.release()
    (run.parent / "r2" / "config.yaml").write_text("again\n")
    second = RunFolder.claim(tmp_path, "e", "r2", overwrite=True)
    second.begin()
    second.release()
    assert len(list(run.parent.glob("r2.old-*"))) == 2


def test_overwrite_is_refused_with_a_resume_or_outside_fit(tmp_path):
    run = fake_run(tmp_path / "e" / "r")
    with pytest.raises(KTMError, match=r"--overwrite with --ckpt_path .* which is inside the run folder .* -> drop --overwrite to resume"):
        RunFolder.claim(tmp_path, "e", "r", ckpt_path=str(run / "checkpoints" / "last.ckpt"), overwrite=True)
    with pytest.raises(KTMError, match=r"--overwrite is only for `ktm fit` \(got `ktm test`\) -> drop --overwrite"):
        RunFolder.claim(tmp_path, "e", "r", command="ktm test", overwrite=True)


def test_a_folder_this_command_made_is_removed_when_nothing_was_written(tmp_path):
    root = tmp_path / "runs"
    folder = RunFolder.claim(root, "e", "r")
    assert (root / "e" / "r" / LOCK_NAME).exists()
    (root / "e" / "r" / "hparams.yaml").write_text("{}")  # TensorBoard's, written before training starts
    folder.release()
    assert not root.exists()  # the root, experiment and run folders were all made by this command
    (root / "e").mkdir(parents=True)
    RunFolder.claim(root, "e", "r").release()
    assert sorted(p.name for p in root.rglob("*")) == ["e"]
    folder = RunFolder.claim(root, "e", "r")
    folder.begin()
    (root / "e" / "r" / "config.yaml").write_text("run: r\n")  # the run started: kept
    folder.release()
    assert sorted(p.name for p in (root / "e" / "r").iterdir()) == ["config.yaml"]


def test_what_a_fit_wrote_before_it_began_is_removed_and_never_moved_with_the_old_run(tmp_path):
    run = fake_run(tmp_path / "e" / "r")
    before = snapshot(run)
    folder = RunFolder.claim(tmp_path, "e", "r", ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    (run / "events.out.tfevents.1.host.2.1").write_bytes(b"tb")  # TensorBoard opens it at setup, before the checks
    folder.release()  # a check failed: the run is as it was
    assert snapshot(run) == before
    folder = RunFolder.claim(tmp_path, "e", "r", ckpt_path=str(run / "checkpoints" / "last.ckpt"))
    (run / "events.out.tfevents.1.host.2.2").write_bytes(b"tb")
    folder.begin()
    folder.release()  # the resume began: its events stay
    assert snapshot(run).keys() == {*before, "events.out.tfevents.1.host.2.2"}
    (run / "events.out.tfevents.1.host.2.2").unlink()
    folder = RunFolder.claim(tmp_path, "e", "r", overwrite=True)
    (run / "events.out.tfevents.1.host.2.3").write_bytes(b"tb")
    aside = folder.begin()
    folder.release()
    assert snapshot(aside) == before  # the new run's early file did not travel with the old run


# -- one process per folder -------------------------------------------------------------------------------


def test_a_second_claim_on_a_locked_folder_is_refused(tmp_path):
    first = RunFolder.claim(tmp_path, "e", "r")
    with pytest.raises(KTMError) as exc:
        RunFolder.claim(tmp_path, "e", "r", command="ktm test")
    text = str(exc.value)
    assert text.startswith(f"run folder {tmp_path / 'e' / 'r'} is in use by another `ktm fit` (pid {os.getpid()} on ")
    assert "so `ktm test` would mix its files with that run's -> wait for it to finish, or pick another --run (or --root)" in text
    first.release()
    RunFolder.claim(tmp_path, "e", "r").release()


def test_a_live_lock_of_another_process_is_refused_a_killed_ones_is_taken_over(tmp_path, ktm_log):
    folder = tmp_path / "e" / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from ktm.training.run_folder import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire('ktm fit'); print('locked', flush=True); time.sleep(120)", str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(KTMError, match=rf"is in use by another `ktm fit` \(pid {holder.pid} on "):
            RunFolder.claim(tmp_path, "e", "r")
    finally:
        holder.send_signal(signal.SIGKILL)  # what kill -9, an OOM kill or a power cut leave: the lock file stays
        holder.wait()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == holder.pid
    claimed = RunFolder.claim(tmp_path, "e", "r")
    assert f"took over the stale lock {folder / LOCK_NAME} of pid {holder.pid}" in ktm_log.text
    assert "that `ktm fit` is no longer running" in ktm_log.text
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    claimed.release()
    assert not (folder / LOCK_NAME).exists()


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch, ktm_log):
    monkeypatch.setattr(rf, "fcntl", None)  # a filesystem without flock: alive = busy, dead = stale
    folder = tmp_path / "e" / "r"
    folder.mkdir(parents=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getppid(), "host": rf.socket.gethostname(), "command": "ktm fit"}))
    with pytest.raises(KTMError, match=rf"in use by another `ktm fit` \(pid {os.getppid()} on "):
        RunFolder.claim(tmp_path, "e", "r")
    lock.write_text(json.dumps({"pid": os.getppid(), "host": "elsewhere", "command": "ktm fit"}))
    with pytest.raises(KTMError, match=rf"-> wait for it to finish, .*; if that run is gone, delete {lock}"):
        RunFolder.claim(tmp_path, "e", "r")
    gone = dead_pid()
    lock.write_text(f"{gone}\n")  # a bare pid (hand-made or foreign) is read too
    claimed = RunFolder.claim(tmp_path, "e", "r")
    assert f"took over the stale lock {lock} of pid {gone}" in ktm_log.text
    claimed.release()
    assert not lock.exists()


def test_a_stale_lock_file_with_flock_is_taken_over(tmp_path, ktm_log):
    folder = tmp_path / "e" / "r"
    folder.mkdir(parents=True)
    gone = dead_pid()
    (folder / LOCK_NAME).write_text(json.dumps({"pid": gone, "host": "h", "command": "ktm fit", "started": "then"}))
    RunFolder.claim(tmp_path, "e", "r").release()
    assert f"took over the stale lock {folder / LOCK_NAME} of pid {gone} on h since then" in ktm_log.text


# -- test/validate without --ckpt_path ---------------------------------------------------------------------


def test_evaluating_a_trained_run_without_a_checkpoint_uses_last_or_refuses(tmp_path):
    assert eval_checkpoint(tmp_path / "none", "ktm test") is None  # no run: the untrained model (a baseline)
    run = fake_run(tmp_path / "r")
    assert eval_checkpoint(run, "ktm test") == run / "checkpoints" / "last.ckpt"
    (run / "checkpoints" / "best.ckpt").write_bytes(b"x")  # selected by checkpoint.monitor: the run's model
    assert eval_checkpoint(run, "ktm test") == run / "checkpoints" / "best.ckpt"
    (run / "checkpoints" / "best.ckpt").unlink()
    (run / "checkpoints" / "last.ckpt").rename(run / "checkpoints" / "epoch=0-step=2.ckpt")
    with pytest.raises(KTMError, match=r"has checkpoints but no last.ckpt, and `ktm validate` was given no --ckpt_path -> "
                                       r"pass --ckpt_path .*epoch=0-step=2.ckpt"):
        eval_checkpoint(run, "ktm validate")
    shutil.rmtree(run / "checkpoints")
    (run / "metrics.json").write_text(json.dumps({"global_step": 8}))
    with pytest.raises(KTMError, match=r"holds a trained run but no checkpoint to evaluate.*untrained model's numbers"):
        eval_checkpoint(run, "ktm test")
    (run / "metrics.json").write_text(json.dumps({"test": {}}))  # a baseline's own metrics: no fit wrote them
    assert eval_checkpoint(run, "ktm test") is None


# -- through the CLI, refused before the base loads -------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["--run", "../escape"], "--run '../escape' contains a path separator"),
    (["--run="], "--run '' is empty"),
    (["--experiment", "/tmp/abs"], "--experiment '/tmp/abs' contains a path separator"),
    (["--run", ".."], "--run '..' is not a folder name"),
])
def test_cli_refuses_names_that_leave_the_root(args, message, tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["fit", "--exp", "tree_k4", *TINY, "--root", str(root), *args]) == 2
    assert message in error_line(capsys)
    assert not root.exists()


def test_cli_refuses_a_folder_with_a_run_a_locked_folder_and_overwrite_outside_fit(tmp_path, capsys):
    root = tmp_path / "runs"
    run = fake_run(root / "tree_k4" / "r")
    before = snapshot(run)
    assert main(["fit", "--exp", "tree_k4", *TINY, "--root", str(root), "--run", "r"]) == 2
    assert f"run folder {run} already holds a run (config.yaml, checkpoints)" in error_line(capsys)
    assert snapshot(run) == before
    held = RunFolder.claim(root, "tree_k4", "busy")
    try:
        assert main(["fit", "--exp", "tree_k4", *TINY, "--root", str(root), "--run", "busy"]) == 2
        assert f"is in use by another `ktm fit` (pid {os.getpid()}" in error_line(capsys)
    finally:
        held.release()
    assert main(["test", "--exp", "tree_k4", *TINY, "--root", str(root), "--run", "fresh", "--overwrite"]) == 2
    assert "--overwrite is only for `ktm fit` (got `ktm test`)" in error_line(capsys)


# -- through the CLI, on a trained run ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import ktm.benchmarks.common as common

    tmp = tmp_path_factory.mktemp("run_folder")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DATA_DIR", tmp / "data")
        assert main(["fit", "--exp", "tree_k4", "--root", str(tmp / "runs"), "--run", "r", *TINY]) == 0
    return tmp / "runs" / "tree_k4" / "r"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run; its config.yaml names the copy's root (as if trained there)."""
    root = tmp_path / "runs"
    shutil.copytree(trained.parents[1], root)
    cfg = root / "tree_k4" / "r" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(trained.parents[1]), str(root)))
    return root / "tree_k4" / "r"


def test_a_run_config_with_other_root_experiment_and_run_writes_there_only(trained, tmp_path, capsys):
    before = snapshot(trained)
    other = tmp_path / "elsewhere"
    assert main(["fit", "--config", str(trained / "config.yaml"), "--root", str(other), "--experiment", "e2", "--run", "copy",
                 "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"), "--trainer.max_epochs=2"]) == 0
    copy = other / "e2" / "copy"
    assert (copy / "metrics.json").exists() and (copy / "export" / "ktm.json").exists()
    assert (copy / "checkpoints" / "last.ckpt").exists() and list(copy.glob("events.out.tfevents.*"))
    steps = json.loads((trained / "metrics.json").read_text())["global_step"]
    assert json.loads((copy / "metrics.json").read_text())["global_step"] == 2 * steps  # resumed: a second epoch
    saved = (copy / "config.yaml").read_text()
    assert f"save_dir: {other}" in saved and "version: copy" in saved and "name: e2" in saved
    assert "ckpt_path: null" in saved and "overwrite: false" in saved  # a resume names its own checkpoint
    assert snapshot(trained) == before  # the original run: not one byte changed
    assert not (copy / LOCK_NAME).exists()


def test_fit_again_is_refused_and_a_check_that_fails_late_changes_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before, config_sha = snapshot(run), sha256_file(run / "config.yaml")
    assert main(["fit", "--config", str(run / "config.yaml")]) == 2
    assert f"run folder {run} already holds a run (config.yaml, checkpoints, metrics.json, export)" in error_line(capsys)
    # data.k_schedule vs model.ks is checked once the base has loaded: the run's config.yaml is not rewritten
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--data.k_schedule=[1,4]"]) == 2
    assert "data.k_schedule uses K=[4] but model.ks is [1, 2]" in error_line(capsys)
    assert snapshot(run) == before and sha256_file(run / "config.yaml") == config_sha
    # the same into a new run: its folder does not stay behind
    assert main(["fit", "--exp", "tree_k4", *TINY, "--root", str(tmp_path / "runs"), "--run", "fresh", "--data.k_schedule=[1,4]"]) == 2
    assert "data.k_schedule uses K=[4]" in error_line(capsys)
    assert not (tmp_path / "runs" / "tree_k4" / "fresh").exists()


def test_test_without_ckpt_path_evaluates_last_ckpt_and_says_so(trained, tmp_path, ktm_log):
    run = copy_run(trained, tmp_path)
    config = (run / "config.yaml").read_bytes()
    assert main(["test", "--config", str(run / "config.yaml")]) == 0
    assert f"no --ckpt_path: ktm test evaluates the run's {run / 'checkpoints' / 'last.ckpt'}" in ktm_log.text
    implicit = json.loads((run / "metrics.json").read_text())["test"]
    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert json.loads((run / "metrics.json").read_text())["test"] == implicit  # the trained model's numbers
    assert (run / "config.yaml").read_bytes() == config  # test keeps the fit's config


def test_a_moved_run_resumes_into_its_own_last_ckpt_not_a_versioned_copy(trained, tmp_path):
    # The copy's checkpoint names the old folder: Lightning would write last-v1.ckpt beside the stale last.ckpt,
    # and `ktm test` (which reads last.ckpt) would evaluate the model from before the resume.
    run = copy_run(trained, tmp_path)
    steps = json.loads((run / "metrics.json").read_text())["global_step"]
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--trainer.max_epochs=2"]) == 0
    assert [p.name for p in (run / "checkpoints").glob("*-v*")] == []
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * steps


def test_overwrite_through_the_cli_trains_anew_beside_the_moved_run(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    assert main(["fit", "--config", str(run / "config.yaml"), "--overwrite"]) == 0
    (aside,) = run.parent.glob("r.old-*")
    assert snapshot(aside) == before
    assert (run / "metrics.json").exists() and (run / "export" / "ktm.json").exists()
    assert list(run.glob("events.out.tfevents.*"))  # TensorBoard reopened in the new folder after the move
    assert "overwrite: false" in (run / "config.yaml").read_text()  # a later `--config` does not move it again
    assert not (run / LOCK_NAME).exists() and not (aside / LOCK_NAME).exists()


def test_reuse_keeps_a_finished_run_of_the_same_config_and_refuses_another(trained, tmp_path, capsys, ktm_log):
    """`make train READ=...` reuses the reading checkpoint with `ktm fit --reuse`: only while it was made with the
    reading experiment's current config; a changed recipe is one line naming the setting, never a silent reuse."""
    run = copy_run(trained, tmp_path)
    root = str(run.parents[1])
    before = snapshot(run)
    same = ["fit", "--exp", "tree_k4", "--root", root, "--run", "r", *TINY, "--reuse"]
    assert main(same) == 0
    assert f"--reuse: {run} holds a finished run of this config; nothing to train" in ktm_log.text
    assert main([*same, "--trainer.enable_progress_bar=true"]) == 0  # how progress shows is not the run
    assert main([*same, "--extends=tree"]) == 0  # nor which experiment file a setting came from (`extends:`)
    assert snapshot(run) == before
    assert main([*same, "--model.lr_encoder=0.002"]) == 2
    assert error_line(capsys) == (f"ktm: error: run folder {run} holds a finished run of another config: model.lr_encoder is 0.0001 "
                                  "there, 0.002 now -> add --overwrite to make it again (the old run is moved aside, nothing is "
                                  "deleted), or pick another --run")
    assert snapshot(run) == before
    # a setting newer than the saved config counts as its default there
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace("  lr_decay_share: 0.0\n", ""))
    assert main(same) == 0
    assert main([*same, "--model.lr_decay_share=0.3"]) == 2
    assert "model.lr_decay_share is 0.0 there, 0.3 now" in error_line(capsys)
    # no finished run (no export): the usual refusal with the resume command, and an empty folder trains
    shutil.rmtree(run / "export")
    assert main([*same, "--model.lr_decay_share=0.0"]) == 2
    assert "already holds a run" in error_line(capsys)
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "new", *TINY, "--reuse"]) == 0
    assert (run.parent / "new" / "export" / "ktm.json").is_file()


def test_reuse_takes_a_longer_wall_clock_cap_only_where_the_run_reached_its_step_budget(trained, tmp_path, capsys, ktm_log):
    """A run that stopped at trainer.max_steps did not depend on its max_time: raising the cap (or dropping it)
    reuses it; a shorter cap, or a run that stopped before its step budget (the cap may have bound), is refused.
    Here as metrics.json recorded it before 2026-12-08 (no stop.by): from global_step and trainer.max_steps."""
    run = copy_run(trained, tmp_path)
    metrics = read_json(run / "metrics.json", "metrics file")
    assert metrics.pop("stop") == {"by": "max_epochs", "planned_steps": metrics["global_step"]}
    write_json(run / "metrics.json", metrics)
    steps = metrics["global_step"]
    saved = run / "config.yaml"
    text = saved.read_text()
    assert "  max_steps: -1\n" in text and "  max_time: 00:00:40:00\n" in text
    saved.write_text(text.replace("  max_steps: -1\n", f"  max_steps: {steps}\n"))
    same = ["fit", "--exp", "tree_k4", "--root", str(run.parents[1]), "--run", "r", *TINY, "--reuse", f"--trainer.max_steps={steps}"]
    before = snapshot(run)
    for cap in ("00:00:40:00", "00:01:30:00", "null"):
        assert main([*same, f"--trainer.max_time={cap}"]) == 0, cap
    for cap in ("00:00:39:00", "{minutes: 45}"):  # shorter; a form other than DD:HH:MM:SS is compared as it is
        assert main([*same, f"--trainer.max_time={cap}"]) == 2
        assert "trainer.max_time is 00:00:40:00 there" in error_line(capsys)
    assert main([*same[:-1], f"--trainer.max_steps={steps + 1}", "--trainer.max_time=00:00:40:00"]) == 2
    assert f"trainer.max_steps is {steps} there, {steps + 1} now" in error_line(capsys)
    saved.write_text(text.replace("  max_steps: -1\n", f"  max_steps: {steps + 1}\n"))  # stopped one step short
    assert main([*same[:-1], f"--trainer.max_steps={steps + 1}", "--trainer.max_time=00:01:00:00"]) == 2
    assert "trainer.max_time is 00:00:40:00 there, 00:01:00:00 now" in error_line(capsys)
    assert {name: data for name, data in snapshot(run).items() if name != "config.yaml"} == {
        name: data for name, data in before.items() if name != "config.yaml"}  # nothing trained, nothing moved


def test_reuse_takes_a_longer_wall_clock_cap_where_metrics_say_the_cap_did_not_stop_the_run(trained, tmp_path, capsys, ktm_log):
    """metrics.json's stop.by: a run that ran out of epochs (or steps, or was finished by its val rule) is reused
    under a longer cap or none; one that trainer.max_time cut short is refused, as is a shorter cap."""
    run = copy_run(trained, tmp_path)
    assert read_json(run / "metrics.json", "metrics file")["stop"]["by"] == "max_epochs"
    same = ["fit", "--exp", "tree_k4", "--root", str(run.parents[1]), "--run", "r", *TINY, "--reuse"]
    before = snapshot(run)
    for cap in ("00:00:40:00", "00:02:00:00", "null"):
        assert main([*same, f"--trainer.max_time={cap}"]) == 0, cap
    assert main([*same, "--trainer.max_time=00:00:20:00"]) == 2
    assert "trainer.max_time is 00:00:40:00 there, 00:00:20:00 now" in error_line(capsys)
    metrics = read_json(run / "metrics.json", "metrics file")
    write_json(run / "metrics.json", {**metrics, "stop": {**metrics["stop"], "by": "max_time"}})
    assert main([*same, "--trainer.max_time=null"]) == 2
    assert "trainer.max_time is 00:00:40:00 there, None now (its cap stopped that run short of its budget)" in error_line(capsys)
    assert {n: d for n, d in snapshot(run).items() if not n.startswith("metrics.json")} == {
        n: d for n, d in before.items() if not n.startswith("metrics.json")}  # nothing trained, nothing moved


def test_reuse_warns_where_the_run_was_trained_on_another_machine_kind(trained, tmp_path, capsys, ktm_log):
    """Same config, another machine's model: a CPU name covers kinds with and without native bf16 (float32 there)."""
    from ktm.environment import environment

    run = copy_run(trained, tmp_path)
    same = ["fit", "--exp", "tree_k4", "--root", str(run.parents[1]), "--run", "r", *TINY, "--reuse"]
    assert main(same) == 0 and "was trained on" not in ktm_log.text  # this machine made it
    metrics = read_json(run / "metrics.json", "metrics file")
    fit = metrics["environment"]["fit"]
    assert fit["avx512_bf16"] == environment()["avx512_bf16"]
    other = {**fit, "avx512_bf16": not fit["avx512_bf16"], "amx_bf16": False}
    write_json(run / "metrics.json", {**metrics, "environment": {**metrics["environment"], "fit": other}})
    assert main(same) == 0
    warned = [r.getMessage() for r in ktm_log.records if "was trained on" in r.getMessage()]
    assert len(warned) == 1 and "(no native bf16)" in warned[0] and "(AVX512-BF16)" in warned[0]
    legacy = {key: value for key, value in fit.items() if key not in ("avx512_bf16", "amx_bf16")}  # flags not recorded
    write_json(run / "metrics.json", {**metrics, "environment": {**metrics["environment"], "fit": legacy}})
    ktm_log.clear()
    assert main(same) == 0 and "was trained on" not in ktm_log.text  # the same CPU name: nothing to say


def test_check_runs_every_check_and_builds_nothing(trained, tmp_path, capsys, ktm_log):
    """`ktm fit --check` (make train's preflight before the reading stages) passes or fails as the fit would at
    its start, in seconds, without loading the base or writing anything: a free folder passes, a taken one is the
    fit's own refusal, a finished run of the same config with --reuse is named as kept, and a benchmark option the
    benchmark does not take fails here (it used to fail only when the data module was set up)."""
    run = copy_run(trained, tmp_path)
    root = run.parents[1]
    before = snapshot(root)
    base = ["fit", "--exp", "tree_k4", "--root", str(root), *TINY, "--check"]
    assert main([*base, "--run", "fresh"]) == 0
    assert f"the run folder {root / 'tree_k4' / 'fresh'} accepts it); nothing was loaded" in ktm_log.text
    assert not (root / "tree_k4" / "fresh").exists()
    assert main([*base, "--run", "r", "--reuse"]) == 0
    assert f"the run folder {run} holds a finished run of this config, which --reuse keeps" in ktm_log.text
    assert main([*base, "--run", "r"]) == 2
    assert "already holds a run" in error_line(capsys)
    assert main([*base, "--run", "r", "--reuse", "--model.lr_encoder=0.002"]) == 2
    assert "holds a finished run of another config: model.lr_encoder" in error_line(capsys)
    assert main([*base, "--run", "fresh", "--data.benchmark_args={n_trees: 120, depth: 3}"]) == 2
    assert "bad options for benchmark 'tree'" in error_line(capsys)
    assert snapshot(root) == before
