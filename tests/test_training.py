"""Lightning layer on tiny config-built models: curriculum, fit/test outputs, resume checks, DDP."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from ktm.cli import main
from ktm.training.data import KTMDataModule

TINY = ["--model.base=config:tiny-llama", "--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=32",
        "--data.max_val_examples=16", "--data.max_test_examples=16", "--data.batch_size=8", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1"]


def test_curriculum_advances_on_threshold_and_max_rounds():
    dm = KTMDataModule(benchmark="tree", stages=["small", "xsmall", "medium"], k_schedule=[1, 2, 4], k_advance="stage",
                       advance_threshold=0.85, final_threshold=0.95, max_rounds=2)
    assert (dm.stage, dm.current_k(4)) == ("small", 1)
    assert dm.after_validation({"balanced_accuracy": 0.5}, 1) == [] and dm.stage == "small"
    assert "advancing to stage xsmall" in dm.after_validation({"balanced_accuracy": 0.9}, 1)[0]
    assert dm.current_k(4) == 2
    dm.after_validation({"balanced_accuracy": 0.1}, 2)
    assert "max_rounds=2" in dm.after_validation({"balanced_accuracy": 0.1}, 2)[0] and dm.stage == "medium"
    assert dm.current_k(4) == 4
    dm.after_validation({"balanced_accuracy": 0.94}, 4)
    assert not dm.finished
    dm.after_validation({"balanced_accuracy": 0.96}, 4)
    assert dm.finished
    state = dm.state_dict()
    fresh = KTMDataModule(benchmark="tree", stages=["small", "xsmall", "medium"])
    fresh.load_state_dict(state)
    assert fresh.stage == "medium" and fresh.finished


def test_curriculum_does_not_finish_before_the_last_k():
    dm = KTMDataModule(benchmark="tree", k_schedule=[1, 4], final_threshold=0.9)
    dm.after_validation({"balanced_accuracy": 1.0}, 1)  # K=1 epoch: perfect, but K=4 has not run
    assert not dm.finished and dm.current_k(4) == 4
    dm.after_validation({"balanced_accuracy": 0.95}, 4)
    assert dm.finished


def test_k_schedule_by_epoch():
    dm = KTMDataModule(benchmark="tree", k_schedule=[1, 2, 4], epochs_per_k=2)
    ks = []
    for _ in range(7):
        ks.append(dm.current_k(4))
        dm.after_validation({"balanced_accuracy": 0.0}, ks[-1])
    assert ks == [1, 1, 2, 2, 4, 4, 4]


def test_mixed_k_schedule_entry_cycles_by_step_and_is_judged_by_its_largest_k():
    dm = KTMDataModule(benchmark="tree", k_schedule=[1, [1, 2, 4]])
    assert dm.schedule_ks() == [1, 2, 4] and dm.current_ks(4) == [1]
    assert [dm.train_k(step, 4) for step in range(3)] == [1, 1, 1]
    dm.after_validation({"balanced_accuracy": 0.0}, 1)
    assert [dm.train_k(step, 4) for step in range(100, 106)] == [2, 4, 1, 2, 4, 1]  # global step, not batch index
    assert dm.current_k(4) == 4


def test_fit_with_a_mixed_k_entry_trains_and_times_each_k(tmp_path):
    root = str(tmp_path / "runs")
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "mix", "--trainer.max_epochs=1", *TINY,
                 "--model.ks=[1,2]", "--data.k_schedule=[[1,2]]"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tree_k4" / "mix" / "metrics.json").read_text())
    assert set(metrics["speed"]) == {"k1", "k2"} and metrics["curriculum"]["k"] == 2
    assert metrics["curriculum"]["k_schedule"] == [[1, 2]]


def test_a_run_capped_by_max_steps_mid_epoch_still_validates_once(tmp_path, capsys):
    root = str(tmp_path / "runs")  # 32 examples, batch 8: an epoch has 4 steps, the cap stops it at 3
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "capped", "--trainer.max_epochs=1",
                 "--trainer.max_steps=3", *TINY, "--model.ks=[1,2]", "--data.k_schedule=[2]"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tree_k4" / "capped" / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and set(metrics["val"]) == {"k1", "k2"}
    assert metrics["stop"] == {"by": "max_steps", "planned_steps": 3}
    epoch_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ktm: epoch ")]
    assert len(epoch_lines) == 1 and epoch_lines[0].startswith("ktm: epoch 0 | step 3 | K=2 |")


@pytest.mark.parametrize("max_steps, step, planned, should_stop, finished, cap, by", [
    (3, 3, 3, True, False, None, "max_steps"),               # ValidateAtMaxSteps asked it to stop there
    (-1, 8, 8, False, False, "00:01:00:00", "max_epochs"),   # the loop ran out of epochs
    (-1, 8, 8, True, False, "00:00:00:00", "max_epochs"),    # the cap ran out on the last step: the budget was run
    (-1, 5, 8, True, True, "00:01:00:00", "val_rule"),       # the curriculum's val rule finished it
    (-1, 5, 8, True, False, "00:00:00:00", "max_time"),      # the cap cut it short of its budget
    (10, 5, 10, True, False, "00:00:00:00", "max_time"),
    (-1, 5, 8, True, False, "00:01:00:00", "other"),         # another callback asked (time left, no rule fired)
])
def test_why_a_fit_stopped(max_steps, step, planned, should_stop, finished, cap, by):
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import Timer

    from ktm.training.callbacks import why_fit_stopped

    trainer = SimpleNamespace(max_steps=max_steps, global_step=step, estimated_stepping_batches=planned,
                              should_stop=should_stop, datamodule=SimpleNamespace(finished=finished),
                              callbacks=[Timer(duration=cap)] if cap else [])
    assert why_fit_stopped(trainer) == by


def test_a_redirected_log_gets_progress_lines_within_an_epoch(tmp_path, capsys, monkeypatch):
    from ktm.training import callbacks

    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.0)  # a line after every step
    root = str(tmp_path / "runs")  # 32 examples, batch 8: 4 steps in one epoch
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "progress", "--trainer.max_epochs=1",
                 "--trainer.max_time=00:00:30:00", *TINY, "--model.ks=[1,2]", "--data.k_schedule=[2]"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ktm: progress: ")]
    assert [line.split(" | ")[0] for line in lines] == [f"ktm: progress: step {s}/4" for s in (1, 2, 3, 4)]
    assert all(" | K=2 | loss " in line and "max_time stops it in " in line for line in lines)
    assert "min left at this pace" in lines[0] and "min left" not in lines[-1]  # nothing left after the last step
    assert "trainer.max_time ends this fit near step" not in err  # 30 minutes left: no warning


@pytest.mark.parametrize("schedule, near", [("[2]", 2), ("[1,2]", 6)])
def test_a_fit_whose_pace_outruns_its_wall_clock_cap_says_so_early(schedule, near, tmp_path, capsys, monkeypatch):
    """A fit that the pace of its final phase says trainer.max_time will cut short warns once, early in that phase
    (here one step into it): with a K=1 epoch first ([1,2], 4 steps an epoch), only once the K=2 epoch runs."""
    from lightning.pytorch.callbacks import Timer

    from ktm.training import callbacks

    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(Timer, "time_remaining", lambda self, stage="train": 1e-6)  # the cap all but spent
    root = str(tmp_path / "runs")
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "slow", "--trainer.max_epochs=2",
                 "--trainer.max_time=00:00:30:00", *TINY, "--model.ks=[1,2]", f"--data.k_schedule={schedule}"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "trainer.max_time ends this fit near step" in line]
    assert len(lines) == 1 and re.search(rf"at this pace \(\d+\.\d s a step\) trainer.max_time ends this fit near step {near} of 8 planned", lines[0])


def test_encoder_learning_rate_per_k():
    from ktm.errors import KTMError
    from ktm.training.module import KTMModule

    module = KTMModule(base="config:tiny-llama", ks=[1, 2, 4], lr_encoder={2: 1e-3, "4": 1e-4})  # '4': as config.yaml writes it
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    assert (groups["encoder_k2"]["lr"], groups["encoder_k4"]["lr"], groups["lora"]["lr"]) == (1e-3, 1e-4, 1e-4)
    k4 = {id(p) for p in module.model.encoders["4"].parameters()}
    assert k4 == {id(p) for p in groups["encoder_k4"]["params"]} and not k4 & {id(p) for p in groups["encoder_k2"]["params"]}
    single = KTMModule(base="config:tiny-llama", ks=[1, 2, 4], lr_encoder=3e-4)
    assert [g["name"] for g in single.configure_optimizers()["optimizer"].param_groups] == ["lora", "encoder"]
    with pytest.raises(KTMError, match=r"model.lr_encoder gives no learning rate for the K=\[4\] merge encoder"):
        KTMModule(base="config:tiny-llama", ks=[1, 2, 4], lr_encoder={2: 1e-3})
    fewer = KTMModule(base="config:tiny-llama", ks=[1, 2], lr_encoder={2: 1e-3, 4: 1e-4})  # e.g. --model.ks=[1,2] on tree_k4
    assert [g["name"] for g in fewer.configure_optimizers()["optimizer"].param_groups] == ["lora", "encoder_k2"]
    with pytest.raises(KTMError, match=r"model.lr_encoder\[4\] must be a number >= 0"):
        KTMModule(base="config:tiny-llama", ks=[1, 2, 4], lr_encoder={2: 1e-3, 4: -1.0})
    with pytest.raises(KTMError, match="has the key 'x', not a K"):
        KTMModule(base="config:tiny-llama", ks=[1, 2, 4], lr_encoder={"x": 1e-3})


def test_a_diverging_encoder_is_named_with_the_fix(tmp_path):
    root = str(tmp_path / "runs")
    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = records.append  # our own handler: caplog would see a record twice while ktm's log propagates
    logging.getLogger("ktm").addHandler(catch)
    try:
        assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "hot", "--trainer.max_epochs=1", *TINY,
                     "--model.ks=[2]", "--data.k_schedule=[2]", "--model.lr_encoder=1.0",
                     "--model.encoder_bound=null"]) == 0  # the paper's unbounded encoder: the bound would hold it
    finally:
        logging.getLogger("ktm").removeHandler(catch)
    warnings = [r.getMessage() for r in records if "merge encoder" in r.getMessage()]
    assert len(warnings) == 1 and "K=2" in warnings[0] and "lower model.lr_encoder" in warnings[0]  # once per K
    run = tmp_path / "runs" / "tree_k4" / "hot"
    watch = json.loads((run / "metrics.json").read_text())["encoder_watch"]  # the record, beside the results
    assert set(watch) == {"k2"} and watch["k2"]["warned"] is True and watch["k2"]["max_correction_ratio"] > 10
    assert f"| 2 | {watch['k2']['max_correction_ratio']:.3f} ({watch['k2']['step']}) | yes |" in (run / "results.md").read_text()


def test_fit_writes_run_outputs_and_test_adds_metrics(tmp_path, capsys):
    root = str(tmp_path / "runs")
    common = ["--exp", "tree_k4", "--root", root, "--run", "r1", "--trainer.max_epochs=2", *TINY]
    assert main(["fit", *common, "--model.ks=[1,2]", "--data.k_schedule=[1,2]"]) == 0
    run = tmp_path / "runs" / "tree_k4" / "r1"
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "export" / "ktm.json").exists() and (run / "export" / "encoder.safetensors").exists()
    # test in bf16-mixed with the generation check: it runs after the test steps, in their precision (the frozen
    # linears are bfloat16 there, and a float32 forward would fail)
    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--trainer.precision=bf16-mixed", "--model.generate_eval_examples=2", "--model.generate_max_new_tokens=3"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["k2"]["generated"] == 2.0 and "exact_match" in metrics["test"]["k1"]
    for split in ("val", "test"):
        for k in ("k1", "k2"):
            for name in ("accuracy", "balanced_accuracy", "majority_baseline", "pl_f1", "perplexity", "compression"):
                assert name in metrics[split][k], (split, k, name)
            m = metrics[split][k]  # the ROC AUC of the label scores wherever both labels occur (majority below 1)
            assert ("auroc" in m) == (m["majority_baseline"] < 1.0) and 0.0 <= m.get("auroc", 0.0) <= 1.0, (split, k, m)
    assert metrics["curriculum"]["k"] == 2 and metrics["data"]["source"] == "generated"
    assert set(metrics["encoder_watch"]) == {"k2"} and metrics["encoder_watch"]["k2"]["warned"] is False  # K=1 has no encoder
    report = (run / "results.md").read_text()
    assert "| test | 2 |" in report and "balanced acc." in report and "majority baseline" in report
    assert metrics["test"]["k1"]["compression"] == 0.0 and metrics["test"]["k2"]["compression"] > 0.4
    events = list(run.glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for e in events:
        acc = EventAccumulator(str(e))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"val/k1/accuracy", "val/k2/balanced_accuracy", "val/k2/pl_f1", "test/k2/majority_baseline"} <= tags
    assert any(t.startswith("speed/k2/") for t in tags) and "train/k" in tags
    assert "train/k2/encoder_correction_ratio" in tags and "train/k1/encoder_correction_ratio" not in tags

    # `ktm generate` answers from the exported run
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(run / "export"), "--max-new-tokens", "3", "Tree: ab\n+cd, Answer: "]) == 0
    assert capsys.readouterr().out.strip() != ""

    # resuming with another K set is refused with a clear line
    code = main(["fit", *common, "--model.ks=[1,4]", "--data.k_schedule=[1,4]",
                 "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ktm: error:") and "model.ks is [1, 2]" in err and len(err.strip().splitlines()) == 1

    # the checkpoint's own metadata check: another base or another K is refused by name
    import torch

    from ktm.errors import KTMError
    from ktm.training.module import KTMModule

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) and all("lora_" in n or n.startswith("model.encoders") for n in ckpt["state_dict"])
    other = KTMModule(base="config:tiny-llama", ks=[1, 4])
    with pytest.raises(KTMError, match=r"checkpoint was trained with ks=\[1, 2\]"):
        other.on_load_checkpoint(ckpt)
    ckpt["ktm"]["base_fingerprint"] = "0" * 64
    with pytest.raises(KTMError, match="base_fingerprint"):
        KTMModule(base="config:tiny-llama", ks=[1, 2]).on_load_checkpoint(ckpt)


def test_unknown_experiment_lists_the_available_ones(capsys):
    assert main(["fit", "--exp", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'nope'" in err and "tree_k4" in err


@pytest.mark.skipif(sys.platform != "linux", reason="gloo DDP smoke runs on Linux CI")
def test_ddp_two_processes_on_cpu(tmp_path):
    env = {**os.environ, "KTM_DATA": str(tmp_path / "data"), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "ktm.cli", "fit", "--exp", "tree_k4", "--root", str(tmp_path / "runs"), "--run", "ddp",
           "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1",
           "--model.ks=[2]", "--data.k_schedule=[2]", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "world_size: 2" in proc.stderr + proc.stdout or "MEMBER: 2/2" in proc.stderr + proc.stdout
    metrics = json.loads((tmp_path / "runs" / "tree_k4" / "ddp" / "metrics.json").read_text())
    assert metrics["val"]["k2"]["examples"] == 16  # both ranks' halves counted once after the sync


def test_optimizer_moments_restart_when_the_k_schedule_moves(tmp_path):
    import torch

    root = str(tmp_path)
    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.INFO)
    catch.emit = records.append
    ktm_log = logging.getLogger("ktm")
    level = ktm_log.level
    ktm_log.addHandler(catch)
    ktm_log.setLevel(logging.INFO)
    try:
        assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "reset", "--trainer.max_epochs=2", *TINY,
                     "--model.ks=[1,2]", "--data.k_schedule=[1,2]", "--model.lr_encoder=1e-3",
                     "--model.reset_optimizer_on_k_change=true"]) == 0
    finally:
        ktm_log.removeHandler(catch)
        ktm_log.setLevel(level)
    assert any(r.getMessage() == "K schedule moved from K=[1] to K=[2]: optimizer moments reset" for r in records)
    ckpt = torch.load(tmp_path / "tree_k4" / "reset" / "checkpoints" / "last.ckpt", weights_only=True)
    steps_per_epoch = ckpt["global_step"] // 2
    lora_state = ckpt["optimizer_states"][0]["state"][0]  # the first LoRA parameter
    assert int(lora_state["step"]) == steps_per_epoch  # counted from the switch, not from the start
    assert ckpt["ktm_k_entry"] == [2]


def test_attention_kernels_and_a_fused_adamw_train_and_tree_k4_takes_the_fast_cpu_path(tmp_path, capsys):
    # tree_k4 trains with attention auto (blocked_causal on CPU) and the fused AdamW: 1.9-2.4x faster K=4 steps than
    # float32 at the same quality over 3 seeds (README Speed); the other kernels stay options. The fused AdamW must
    # work with gradient clipping under bf16-mixed (Lightning refused it).
    import torch

    from ktm.errors import KTMError
    from ktm.training.module import KTMModule

    assert not any(g["fused"] for g in KTMModule(base="config:tiny-llama", ks=[1, 2]).configure_optimizers()["optimizer"].param_groups)
    fused = KTMModule(base="config:tiny-llama", ks=[1, 2], fused_adamw=True).configure_optimizers()["optimizer"]
    assert all(g["fused"] for g in fused.param_groups)
    common = ["fit", "--exp", "tree_k4", "--root", str(tmp_path), *TINY, "--model.ks=[1,2]", "--data.k_schedule=[1,2]",
              "--model.lr_encoder=1e-3", "--model.lr_lora=1e-3", "--trainer.max_epochs=2"]  # clipping on, as in every experiment
    assert main([*common, "--run", "default"]) == 0
    assert "on CPUAccelerator, blocked_causal attention" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "tree_k4" / "default" / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(g["fused"] for g in ckpt["optimizer_states"][0]["param_groups"])
    for precision, kernel, fused_adamw, frozen in (("bf16-mixed", "eager", "true", "bfloat16"), ("32-true", "sdpa", "false", "float32"),
                                                   ("bf16-mixed", "eager_float32", "true", "bfloat16")):
        assert main([*common, "--run", f"fast_{precision}_{kernel}", f"--model.attention={kernel}", f"--model.fused_adamw={fused_adamw}",
                     f"--trainer.precision={precision}"]) == 0
        # bf16-mixed keeps the frozen linears in bfloat16 (what autocast computes them in; bit-identical, test_method)
        assert (f"training in {precision} precision on CPUAccelerator, {kernel} attention, frozen base linears in {frozen}"
                in capsys.readouterr().err)
    with pytest.raises(KTMError, match=r"model.attention must be one of auto, sdpa, eager, eager_float32, blocked_causal, got 'flash'"):
        KTMModule(base="config:tiny-llama", ks=[1, 2], attention="flash")


def test_profile_steps_writes_the_step_time_and_operator_table(tmp_path):
    assert main(["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--run", "prof", *TINY, "--model.ks=[1,2]",
                 "--data.k_schedule=[1,2]", "--model.lr_lora=1e-3", "--trainer.max_epochs=1",
                 "--trainer.callbacks+=ktm.training.callbacks.ProfileSteps", "--trainer.callbacks.init_args.start=1",
                 "--trainer.callbacks.init_args.steps=2"]) == 0
    text = (tmp_path / "tree_k4" / "prof" / "profile.txt").read_text()
    assert text.startswith("training steps 1-2: ") and " ms per step" in text.splitlines()[0]
    assert "aten::mm" in text and "Self CPU" in text
    assert main(["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--run", "clock", *TINY, "--model.ks=[1,2]",
                 "--data.k_schedule=[1,2]", "--model.lr_lora=1e-3", "--trainer.max_epochs=1",
                 "--trainer.callbacks+=ktm.training.callbacks.ProfileSteps", "--trainer.callbacks.init_args.start=1",
                 "--trainer.callbacks.init_args.steps=2", "--trainer.callbacks.init_args.profile=false"]) == 0
    text = (tmp_path / "tree_k4" / "clock" / "profile.txt").read_text()
    assert text.startswith("training steps 1-2: ") and "aten::" not in text


def test_lora_learning_rate_per_k_applies_from_the_first_step_of_each_k(tmp_path):
    import torch

    from ktm.errors import KTMError
    from ktm.training.module import KTMModule

    root = str(tmp_path)
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "lrk", "--trainer.max_epochs=2", *TINY,
                 "--model.ks=[1,2]", "--data.k_schedule=[1,2]", "--model.lr_encoder=1e-3",
                 "--model.lr_lora={1: 1.0e-3, '2': 0.0}", "--checkpoint.save_top_k=-1"]) == 0
    folder = tmp_path / "tree_k4" / "lrk" / "checkpoints"
    first, second = (torch.load(p, weights_only=True) for p in sorted(folder.glob("epoch=*.ckpt")))
    lora = [n for n in first["state_dict"] if "lora_" in n]
    encoder = [n for n in first["state_dict"] if "encoders" in n]
    assert lora and encoder and second["global_step"] == 2 * first["global_step"]
    # lr 0 for K=2 steps: the LoRA stays exactly where the K=1 epoch left it (its first K=2 step included),
    # while the K=2 encoder trains
    assert all(torch.equal(first["state_dict"][n], second["state_dict"][n]) for n in lora)
    assert any(not torch.equal(first["state_dict"][n], second["state_dict"][n]) for n in encoder)
    assert not all(torch.count_nonzero(first["state_dict"][n]) == 0 for n in lora if "lora_B" in n)  # K=1 did train it
    with pytest.raises(KTMError, match=r"model.lr_lora gives no learning rate for K=\[2\]"):
        KTMModule(base="config:tiny-llama", ks=[1, 2], lr_lora={1: 1e-3})
    with pytest.raises(KTMError, match=r"model.lr_lora\[2\] must be a number >= 0"):
        KTMModule(base="config:tiny-llama", ks=[1, 2], lr_lora={1: 1e-3, 2: -1.0})


def test_a_mixed_k_entry_watches_every_k_encoder(tmp_path):
    """With [2, 4] K=4 trains on odd steps only: a watch at step % N == 0 alone never saw its encoder."""
    root = str(tmp_path / "runs")
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "mix", "--trainer.max_steps=8", *TINY,
                 "--trainer.log_every_n_steps=4", "--model.ks=[2,4]", "--data.k_schedule=[[2,4]]",
                 "--model.lr_lora=1.0e-4", "--model.lr_encoder=1.0e-4"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "runs" / "tree_k4" / "mix"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/k2/encoder_correction_ratio", "train/k4/encoder_correction_ratio"} <= tags


@pytest.mark.parametrize("step, warmup, planned, share, factor", [
    (0, 0, 1000, 0.0, 1.0),        # constant: the paper
    (999, 0, 1000, 0.0, 1.0),
    (0, 4, 1000, 0.0, 0.25),       # warm-up alone
    (3, 4, 1000, 0.0, 1.0),
    (699, 0, 1000, 0.3, 1.0),      # stable until the decay's first step
    (700, 0, 1000, 0.3, 1.0),
    (850, 0, 1000, 0.3, 0.5),      # halfway down
    (999, 0, 1000, 0.3, 1 / 300),  # the last planned step still trains
    (1000, 0, 1000, 0.3, 0.0),     # past the plan: nothing left
    (0, 4, 8, 1.0, 0.25),          # warm-up and decay overlap: the smaller wins
    (500, 0, float("inf"), 0.3, 1.0),  # no planned end (max_time only): no decay
])
def test_lr_factor(step, warmup, planned, share, factor):
    from ktm.training.module import lr_factor

    assert lr_factor(step, warmup, planned, share) == pytest.approx(factor)


def test_lr_decay_reaches_every_group_at_the_planned_steps(tmp_path):
    """2 epochs of 4 steps = 8 planned steps; decay over the last 6: the per-K LoRA lr (set at each step) and the
    encoder lr (the scheduler's) both follow min(1, (8 - step) / 6), logged at every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ktm.errors import KTMError
    from ktm.training.module import KTMModule

    root = str(tmp_path / "runs")
    assert main(["fit", "--exp", "tree_k4", "--root", root, "--run", "decay", "--trainer.max_epochs=2", *TINY,
                 "--model.ks=[1,2]", "--data.k_schedule=[1,2]", "--model.lr_lora={1: 1.0e-3, 2: 3.0e-4}",
                 "--model.lr_encoder=1.0e-4", "--model.lr_decay_share=0.75"]) == 0
    acc = EventAccumulator(str(tmp_path / "runs" / "tree_k4" / "decay"))
    acc.Reload()
    factors = [min(1.0, (8 - s) / 6) for s in range(8)]
    lora = [e.value for e in sorted(acc.Scalars("train/lr/lora"), key=lambda e: e.step)]
    encoder = [e.value for e in sorted(acc.Scalars("train/lr/encoder"), key=lambda e: e.step)]
    assert lora == pytest.approx([(1e-3 if s < 4 else 3e-4) * f for s, f in enumerate(factors)])
    assert encoder == pytest.approx([1e-4 * f for f in factors])
    with pytest.raises(KTMError, match=r"model.lr_decay_share must be a number in \[0, 1\], got 1.5"):
        KTMModule(base="config:tiny-llama", ks=[1, 2], lr_decay_share=1.5)


def _drawn(dm, epochs):
    """The training examples of `epochs` successive epochs, as (prompt, target) sets."""
    draws = []
    for _ in range(epochs):
        draws.append({(e.prompt, e.target) for e in dm.train_examples()})
        dm.after_validation({"balanced_accuracy": 0.0}, 1)
    return draws


def test_train_pool_fixes_one_seeded_subset_and_each_epoch_draws_from_it():
    args = dict(benchmark="tree", benchmark_args={"n_trees": 60}, k_schedule=[1], balanced_train=False, max_train_examples=10)
    pooled = _drawn(KTMDataModule(train_pool=20, **args), 4)
    assert all(len(d) == 10 for d in pooled) and len(set().union(*pooled)) <= 20
    assert len({frozenset(d) for d in pooled}) > 1  # the per-epoch draw still varies inside the pool
    assert _drawn(KTMDataModule(train_pool=20, **args), 4) == pooled  # seeded: the same pool and draws again
    other = set().union(*_drawn(KTMDataModule(train_pool=20, **{**args, "seed": 1}), 4))
    assert other != set().union(*pooled)
    unpooled = set().union(*_drawn(KTMDataModule(**args), 4))
    assert len(unpooled) > 20  # without a pool, four epochs of 10 reach beyond any 20
    full = KTMDataModule(train_pool=10**6, **{**args, "max_train_examples": None})
    assert len(full.train_examples()) == len(full.splits(full.stage).train)  # a pool larger than the split keeps it all


def test_phase_shifts_are_fixed_by_step_and_row_and_cover_every_phase():
    from ktm.training.module import phase_shifts

    draws = [phase_shifts(s, 8, 4) for s in range(200)]
    assert draws == [phase_shifts(s, 8, 4) for s in range(200)]  # the same on a resumed run
    flat = [j for row in draws for j in row]
    assert set(flat) == {0, 1, 2, 3} and all(0.2 < flat.count(j) / len(flat) < 0.3 for j in range(4))
    assert len({tuple(d) for d in draws}) > 150  # another step, other shifts
    assert set(j for s in range(50) for j in phase_shifts(s, 8, 2)) == {0, 1}


def test_phase_jitter_keeps_more_last_tokens_at_merged_training_steps_only(tmp_path, monkeypatch):
    """Every K > 1 training step leaves 0..K-1 more last prompt tokens in tokens (drawn by phase_shifts), which moves
    the prompt's block boundaries; K=1 steps, validation and test build the plain layout."""
    import torch

    from ktm.model import KTMModel
    from ktm.training.module import phase_shifts

    calls: list[tuple[bool, int, list[int]]] = []
    build = KTMModel.build_batch

    def spy(self, prompt_ids, k, target_ids=None, unscored=None, kept=None, policy=None):
        calls.append((torch.is_grad_enabled(), k, list(kept or [])))
        return build(self, prompt_ids, k, target_ids, unscored, kept, policy)

    monkeypatch.setattr(KTMModel, "build_batch", spy)
    assert main(["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--run", "jitter", "--trainer.max_epochs=2", *TINY,
                 "--model.ks=[1,4]", "--data.k_schedule=[1,4]", "--model.phase_jitter=true"]) == 0
    train = [(k, kept) for grad, k, kept in calls if grad]
    assert [k for k, _ in train] == [1] * 4 + [4] * 4  # 32 examples in batches of 8, one epoch per K
    assert all(kept == [0] * 8 for k, kept in train if k == 1)
    assert [kept for k, kept in train if k == 4] == [phase_shifts(step, 8, 4) for step in range(4, 8)]
    assert all(not any(kept) for grad, _, kept in calls if not grad)  # evaluation: the plain layout


def test_a_resumed_runs_time_left_counts_only_the_steps_this_session_trained(monkeypatch, caplog):
    """Lightning restores global_step after on_fit_start: the pace starts at on_train_start (resumed at step 58 of 116,
    10 steps in 100 s leave 48 steps, 8 min; counting the 58 steps of the earlier session said 1 min)."""
    import time
    from types import SimpleNamespace

    import torch

    from ktm.training import callbacks

    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(callbacks, "PROGRESS_EVERY_S", 0.0)
    trainer = SimpleNamespace(global_step=58, max_steps=116, callbacks=[], is_global_zero=True)
    progress = callbacks.EpochLog()
    progress.on_train_start(trainer, None)
    clock[0], trainer.global_step = 100.0, 68
    logger = logging.getLogger("ktm")  # the CLI's logger does not propagate: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ktm"):
            progress.on_train_batch_end(trainer, SimpleNamespace(current_k=lambda: 1), {"loss": torch.tensor(0.5)}, None, 0)
    finally:
        logger.removeHandler(caplog.handler)
    assert "progress: step 68/116 | K=1 | loss 0.500 | 100 s | about 8 min left at this pace" in caplog.text
