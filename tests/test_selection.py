"""checkpoint.monitor: the best validation becomes the run's model (export, metrics.json, ktm test), only
validations on the curriculum's last data stage count, and a monitor that would select nothing or the worst
is one line before anything runs."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from ktm.cli import main
from ktm.curves import k_scalars
from ktm.errors import KTMError
from ktm.io import verify
from ktm.training.checkpointing import check_monitor

TINY = ["--exp", "tree_k4", "--model.base=config:tiny-llama", "--model.ks=[1,2]", "--data.k_schedule=[2]",
        "--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=32", "--data.max_val_examples=16",
        "--data.max_test_examples=16", "--data.batch_size=8", "--trainer.enable_progress_bar=false",
        "--trainer.max_time=null", "--data.final_threshold=1.0", "--model.lr_lora=0.01"]


class LastSaved(L.Callback):
    """Test helper: the step last.ckpt holds when each epoch starts (a resume from it must lose no epoch)."""

    steps: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        last = trainer.checkpoint_callback.dirpath + "/last.ckpt"
        LastSaved.steps.append(torch.load(last, weights_only=True)["global_step"] if trainer.current_epoch else 0)


@pytest.mark.parametrize("monitor,mode,ks,eval_ks,message", [
    (None, "min", [4], None, None),
    ("val/k4/pl_f1", "max", [1, 4], None, None),
    ("val/k4/balanced_accuracy", "max", [1, 4], None, None),
    ("val/kmean/balanced_accuracy", "max", [1, 2, 4], None, None),
    ("val/k2/perplexity", "min", [1, 2], [2], None),
    ("val_loss", "min", [4], None, r"'val_loss' is not a validation number ktm selects by: val/k<K>/<metric>"),
    ("val/k4/f1", "max", [4], None, r"metric one of balanced_accuracy, accuracy, pl_f1, perplexity"),
    ("test/k4/accuracy", "max", [4], None, r"not a validation number"),
    ("val/k8/accuracy", "max", [1, 4], None, r"K=8 is not evaluated \(validation runs K in \[1, 4\]\) -> monitor one of "
                                              r"val/k1/accuracy, val/k4/accuracy, or val/kmean/accuracy"),
    ("val/k1/accuracy", "max", [1, 4], [4], r"K=1 is not evaluated"),
    ("val/k4/balanced_accuracy", "min", [4], None, r"balanced_accuracy is better when higher, so this would keep the "
                                                   r"worst checkpoint -> add --checkpoint.mode=max"),
    ("val/k4/perplexity", "max", [4], None, r"better when lower.* -> add --checkpoint.mode=min"),
])
def test_check_monitor(monitor, mode, ks, eval_ks, message):
    if message is None:
        check_monitor(monitor, mode, ks, eval_ks)
    else:
        with pytest.raises(KTMError, match=message):
            check_monitor(monitor, mode, ks, eval_ks)


def test_a_perplexity_benchmark_has_no_accuracy_to_select_by():
    check_monitor("val/k2/perplexity", "min", [1, 2], None, task="perplexity")
    with pytest.raises(KTMError, match=r"scored by perplexity, not accuracy -> monitor val/k2/perplexity with --checkpoint.mode=min"):
        check_monitor("val/k2/balanced_accuracy", "max", [1, 2], None, task="perplexity")


def test_a_bad_monitor_is_one_line_before_the_run_folder_exists(tmp_path, capsys):
    code = main(["fit", *TINY, "--root", str(tmp_path), "--run", "r", "--checkpoint.monitor=val/k2/balanced_accuracy"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "add --checkpoint.mode=max" in err
    assert not (tmp_path / "tree_k4" / "r").exists()


def test_the_best_validation_becomes_the_export_and_what_ktm_test_evaluates(tmp_path, caplog):
    root = tmp_path / "runs"
    monitor = "val/k2/balanced_accuracy"
    LastSaved.steps = []
    assert main(["fit", *TINY, "--root", str(root), "--run", "sel", "--trainer.max_epochs=4", f"--checkpoint.monitor={monitor}",
                 "--checkpoint.mode=max", "--trainer.callbacks+=test_selection.LastSaved"]) == 0
    assert LastSaved.steps == [0, 4, 8, 12]  # last.ckpt moved on at every epoch, improved or not
    run = root / "tree_k4" / "sel"
    metrics = json.loads((run / "metrics.json").read_text())
    selected = metrics["selected"]
    logged = [(step, value) for _, step, value in k_scalars(run)[("val", 2, "balanced_accuracy")]]
    assert len(logged) == 4 and selected["value"] == pytest.approx(max(v for _, v in logged))
    assert metrics["val"]["k2"]["balanced_accuracy"] == pytest.approx(selected["value"])  # that validation, not the last one
    assert metrics["global_step"] == selected["final_step"] == 16 and selected["checkpoint"] == "best.ckpt"

    best = run / "checkpoints" / "best.ckpt"
    verify(best, "training checkpoint")
    ckpt = torch.load(best, weights_only=True)
    assert ckpt["global_step"] == selected["step"] and ckpt["ktm_val"][2]["balanced_accuracy"] == pytest.approx(selected["value"])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16  # the final state, for resume
    exported = load_file(run / "export" / "encoder.safetensors")
    name = next(n for n in exported if n.endswith("weight"))
    in_ckpt = [t for n, t in ckpt["state_dict"].items() if n.startswith("model.encoders") and n.endswith(name.split("encoders.")[-1])]
    assert in_ckpt and any(torch.equal(t, exported[name]) for t in in_ckpt)

    logger = logging.getLogger("ktm")  # the CLI's logger does not propagate: listen to it directly
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ktm"):
            assert main(["test", "--config", str(run / "config.yaml")]) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert f"evaluates the run's {best}" in caplog.text
    assert "k2" in json.loads((run / "metrics.json").read_text())["test"]
    assert f"model: the best validation, step {selected['step']} of 16 ({monitor} " in (run / "results.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["evaluated"] == {"test": "best.ckpt"}
    assert "not the run's model" not in (run / "results.md").read_text()

    # another checkpoint's test numbers say whose they are, under the run's selected model
    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    assert json.loads((run / "metrics.json").read_text())["evaluated"] == {"test": "last.ckpt"}
    assert "test: of last.ckpt, not the run's model (best.ckpt)" in (run / "results.md").read_text()


def test_only_validations_on_the_last_data_stage_are_candidates(tmp_path):
    root = tmp_path / "runs"
    # epoch 0 trains and validates the small trees, epoch 1 the xsmall ones (max_rounds=1 moves on after one epoch)
    assert main(["fit", *TINY, "--root", str(root), "--run", "stages", "--trainer.max_epochs=2", "--data.stages=[small, xsmall]",
                 "--data.max_rounds=1", "--checkpoint.monitor=val/kmean/perplexity"]) == 0
    selected = json.loads((root / "tree_k4" / "stages" / "metrics.json").read_text())["selected"]
    assert selected["step"] == selected["final_step"] == 8 and selected["monitor"] == "val/kmean/perplexity"


def test_saves_every_n_steps_are_never_candidates(tmp_path):
    # 4 steps an epoch, a save every 3 steps: the step-3, 6 and 9 saves would carry the previous validation's score
    root = tmp_path / "runs"
    assert main(["fit", *TINY, "--root", str(root), "--run", "steps", "--trainer.max_epochs=3", "--checkpoint.every_n_train_steps=3",
                 "--checkpoint.monitor=val/k2/perplexity"]) == 0
    run = root / "tree_k4" / "steps"
    selected = json.loads((run / "metrics.json").read_text())["selected"]
    assert selected["step"] in (4, 8, 12) and selected["final_step"] == 12
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12


def test_a_run_capped_by_max_steps_mid_epoch_selects_from_its_final_validation_too(tmp_path):
    # 4 steps an epoch, max_steps=10: ValidateAtMaxSteps validates at step 10, and that state competes
    root = tmp_path / "runs"
    assert main(["fit", *TINY, "--root", str(root), "--run", "capped", "--trainer.max_epochs=3", "--trainer.max_steps=10",
                 "--checkpoint.monitor=val/k2/perplexity", "--checkpoint.save_top_k=-1"]) == 0
    checkpoints = root / "tree_k4" / "capped" / "checkpoints"
    candidates = sorted(torch.load(p, weights_only=True)["global_step"] for p in checkpoints.glob("epoch=*.ckpt"))
    assert candidates == [4, 8, 10]
    assert json.loads((root / "tree_k4" / "capped" / "metrics.json").read_text())["selected"]["final_step"] == 10
