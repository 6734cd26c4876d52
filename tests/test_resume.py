"""Interrupted runs resume exactly: kill -9 mid-epoch, Ctrl-C mid-step and SIGTERM, then the documented
resume command, end with the same weights and metrics as an uninterrupted run with the same seed.

The runs are real `python -m ktm.cli fit` processes on the tiny config-built Llama (LoRA dropout 0.05
on, so the RNG stream matters). `FreezeAt` parks the process at a chosen step so the signal lands at a
known point (mid-epoch, after a periodic checkpoint) instead of wherever the scheduler happens to be.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from ktm.cli import main
from ktm.io import verify

TESTS = Path(__file__).resolve().parent
# 32 examples / batch 8 = 4 steps per epoch, 2 epochs = 8 steps; a periodic checkpoint every 3 steps.
ARGS = ["--exp", "tree_k4", "--model.base=config:tiny-llama", "--model.ks=[1,2]", "--data.k_schedule=[1,2]", "--model.lr_decay_share=0.5",
        "--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=32", "--data.max_val_examples=16",
        "--data.max_test_examples=16", "--data.batch_size=8", "--trainer.max_epochs=2", "--trainer.max_time=null",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1",
        "--checkpoint.every_n_train_steps=3", "--trainer.callbacks+=test_resume.FreezeAt"]


class FreezeAt(L.Callback):
    """Test helper: when KTM_TEST_FREEZE_AT=<global step> is set, write KTM_TEST_FREEZE_MARK and sleep,
    either after that step (`batch_end`) or inside the next one, after its forward pass (`backward`).
    A SIGTERM ends the sleep (as a real step would end): Lightning stops after the step in flight."""

    def _freeze(self, trainer, where: str) -> None:
        at = os.environ.get("KTM_TEST_FREEZE_AT")
        if at and os.environ.get("KTM_TEST_FREEZE_WHERE", "batch_end") == where and trainer.global_step == int(at):
            Path(os.environ["KTM_TEST_FREEZE_MARK"]).write_text(str(trainer.global_step))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not trainer.received_sigterm:
                time.sleep(0.05)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._freeze(trainer, "batch_end")

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._freeze(trainer, "backward")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its metrics and exported weights are what every resumed run must match."""
    import ktm.benchmarks.common as common

    tmp = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DATA_DIR", tmp / "data")
        assert main(["fit", *ARGS, "--root", str(tmp / "runs"), "--run", "reference"]) == 0
    return tmp, tmp / "runs" / "tree_k4" / "reference"


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_and_freeze(tmp: Path, run: str, at: int, where: str) -> subprocess.Popen:
    mark = tmp / f"{run}.frozen"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "KTM_DATA": str(tmp / "data"), "KTM_TEST_FREEZE_AT": str(at), "KTM_TEST_FREEZE_WHERE": where,
           "KTM_TEST_FREEZE_MARK": str(mark), "PYTHONWARNINGS": "ignore"}
    # A job started with `cmd &` by a non-interactive shell inherits SIGINT as ignored, and Python keeps it
    # so: the child sets the default disposition itself, so the Ctrl-C test does not depend on how pytest
    # was launched (the product rightly respects an inherited ignore).
    proc = subprocess.Popen([sys.executable, "-m", "ktm.cli", "fit", *ARGS, "--root", str(tmp / "runs"), "--run", run],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS.parent,
                            preexec_fn=_default_sigint)
    deadline = time.monotonic() + 240
    while not mark.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before step {at}: {err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not reach step {at} in time")
        time.sleep(0.1)
    return proc


def assert_same_as_reference(reference_run: Path, run: Path) -> None:
    from safetensors.torch import load_file

    ref, got = json.loads((reference_run / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    assert got["global_step"] == ref["global_step"] == 8
    assert got["val"].keys() == ref["val"].keys() == {"k1", "k2"}
    for k in ref["val"]:
        assert got["val"][k] == pytest.approx(ref["val"][k], rel=1e-6, abs=1e-9), k
    assert got["encoder_watch"].keys() == ref["encoder_watch"].keys() == {"k2"}  # the watch's record travels too
    for k, w in ref["encoder_watch"].items():
        assert (got["encoder_watch"][k]["step"], got["encoder_watch"][k]["warned"]) == (w["step"], w["warned"])
        assert got["encoder_watch"][k]["max_correction_ratio"] == pytest.approx(w["max_correction_ratio"], rel=1e-5)
    for name in ("encoder.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(reference_run / "export" / name), load_file(run / "export" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=f"{name}:{key}")
    # last.ckpt is the final state (not the step-6 periodic save), so `ktm test --ckpt_path last.ckpt` tests it
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 8


def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(reference, capsys):
    tmp, reference_run = reference
    proc = start_and_freeze(tmp, "killed", at=5, where="batch_end")  # epoch 1, after its first step
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    run = tmp / "runs" / "tree_k4" / "killed"
    last = run / "checkpoints" / "last.ckpt"
    verify(last, "checkpoint")  # complete, with its checksum: written atomically before the kill
    state = torch.load(last, weights_only=False)
    assert state["global_step"] == 3  # the periodic save in the middle of epoch 0 (4 steps)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"key": "seed=0/stage=small/epoch=0/done=0/n=32", "trained": 3}]
    assert not (run / "metrics.json").exists() and not (run / "export").exists()
    # the documented resume command
    capsys.readouterr()
    assert main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last)]) == 0
    assert "resuming mid-epoch: skipping the 3 batch(es) this epoch already trained on" in capsys.readouterr().err
    assert_same_as_reference(reference_run, run)


def test_ctrl_c_mid_step_saves_a_checkpoint_and_its_resume_command_matches(reference):
    tmp, reference_run = reference
    proc = start_and_freeze(tmp, "ctrl_c", at=5, where="backward")  # inside step 6: forward done, no update yet
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)  # generous: a loaded CI machine is slow, a hang still fails
    run = tmp / "runs" / "tree_k4" / "ctrl_c"
    saved = run / "checkpoints" / "interrupted.ckpt"
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    expected = f"ktm: interrupted; saved {saved}. Resume with: ktm fit --config {run / 'config.yaml'} --ckpt_path {saved}"
    assert expected in err.splitlines()
    verify(saved, "checkpoint")
    assert torch.load(saved, weights_only=False)["global_step"] == 5
    command = expected.split("Resume with: ktm ", 1)[1].split()
    assert main(command) == 0
    assert_same_as_reference(reference_run, run)


def test_sigterm_saves_a_checkpoint_exits_143_and_its_resume_command_matches(reference):
    """What `timeout`, SLURM, Kubernetes and `docker stop` send: like Ctrl-C, but after the step in flight."""
    tmp, reference_run = reference
    proc = start_and_freeze(tmp, "sigterm", at=5, where="batch_end")  # epoch 1, after its first step
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    run = tmp / "runs" / "tree_k4" / "sigterm"
    saved = run / "checkpoints" / "interrupted.ckpt"
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    expected = f"ktm: stopped by SIGTERM; saved {saved}. Resume with: ktm fit --config {run / 'config.yaml'} --ckpt_path {saved}"
    assert expected in err.splitlines()
    verify(saved, "checkpoint")
    assert torch.load(saved, weights_only=False)["global_step"] == 5
    assert not (run / "ktm.lock").exists()  # released on the way out
    first_session = torch.load(saved, weights_only=False)["callbacks"]["RunOutputs"]["fit_seconds"]
    assert first_session > 0
    command = expected.split("Resume with: ktm ", 1)[1].split()
    assert main(command) == 0
    assert_same_as_reference(reference_run, run)
    # the fit time counts the interrupted session too, not only the resumed one
    assert json.loads((run / "metrics.json").read_text())["wall_seconds"]["fit"] >= round(first_session, 1)


def test_a_second_signal_during_the_save_does_not_cut_it_short(tmp_path, capsys):
    """Ctrl-C pressed again (or SIGTERM after Ctrl-C) while interrupted.ckpt is written: the save completes,
    the signals are only noted, and the handlers in place before come back."""
    from types import SimpleNamespace

    from ktm.io import write_bytes
    from ktm.training.callbacks import SaveOnInterrupt

    class Trainer:
        state = SimpleNamespace(fn="fit")
        is_global_zero = True
        logger = None
        default_root_dir = str(tmp_path / "run")

        def save_checkpoint(self, path) -> None:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handlers run here, mid-save
            write_bytes(path, b"state" * 1000)

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    callback, trainer = SaveOnInterrupt(), Trainer()
    callback.on_train_start(trainer, None)
    callback.on_exception(trainer, None, KeyboardInterrupt())
    saved = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    assert callback.saved == saved and callback.exit_code == 130
    assert verify(saved, "checkpoint").read_bytes() == b"state" * 1000
    err = capsys.readouterr().err
    assert "ktm: finishing the checkpoint save first" in err and f"ktm: interrupted; saved {saved}. Resume with:" in err
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_fit_seconds_of_earlier_sessions_travel_in_the_checkpoint():
    from ktm.training.callbacks import RunOutputs

    fresh = RunOutputs(export=False, tensorboard=False)
    assert 0 <= fresh.state_dict()["fit_seconds"] < 60  # a new fit counts from its own start
    resumed = RunOutputs(export=False, tensorboard=False)
    resumed.load_state_dict({"fit_seconds": 1000.0})  # what a checkpoint of a 1000-second session holds
    assert 1000.0 <= resumed.state_dict()["fit_seconds"] < 1060
    resumed.load_state_dict({})  # a checkpoint from before fit_seconds was saved
    assert resumed.fit_seconds_before == 0.0


def test_a_run_cut_short_by_max_time_says_so_and_its_finish_command_matches(reference, tmp_path, monkeypatch, capsys):
    """trainer.max_time ending a fit before its step budget is recorded (metrics.json stop.by) and said in one
    warning line whose command trains the whole budget anew, the capped run kept aside: the uncapped run's model."""
    from lightning.pytorch.callbacks import Timer

    tmp, reference_run = reference
    assert json.loads((reference_run / "metrics.json").read_text())["stop"] == {"by": "max_epochs", "planned_steps": 8}
    seen = {"step": 0}  # the cap "runs out" after step 5 (mid epoch 1) on every machine: elapsed follows the step
    original = Timer.on_train_batch_end

    def step_then_check(self, trainer, *args, **kwargs):
        seen["step"] = trainer.global_step
        return original(self, trainer, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(Timer, "on_train_batch_end", step_then_check)
        mp.setattr(Timer, "time_elapsed", lambda self, stage="train": 1e6 if seen["step"] >= 5 else 0.0)
        assert main(["fit", *ARGS, "--root", str(tmp / "runs"), "--run", "capped", "--trainer.max_time=00:00:30:00"]) == 0
    run = tmp / "runs" / "tree_k4" / "capped"
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["global_step"], metrics["stop"]) == (5, {"by": "max_time", "planned_steps": 8})
    lines = [line for line in capsys.readouterr().err.splitlines() if "trainer.max_time" in line]
    finish = f"ktm fit --config {run / 'config.yaml'} --trainer.max_time=null --overwrite"
    assert len(lines) == 1 and "trainer.max_time 00:00:30:00 ended this fit at step 5 of 8 planned" in lines[0]
    assert lines[0].endswith(finish)
    assert main(finish.split()[1:]) == 0
    assert_same_as_reference(reference_run, run)
    aside = [p for p in run.parent.iterdir() if p.name.startswith("capped.old-")]  # the capped run, kept
    assert len(aside) == 1 and json.loads((aside[0] / "metrics.json").read_text())["global_step"] == 5
    assert json.loads((run / "metrics.json").read_text())["stop"] == {"by": "max_epochs", "planned_steps": 8}
