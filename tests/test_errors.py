"""Bad input gets one clear line (`ktm: error: <problem> -> <fix>`, exit 2) and loses nothing already written.

Every test asserts the message itself. A module-scoped tiny run (a 2-layer Llama saved as a local HF
folder, so it has a real weights fingerprint) provides the export folder and the Lightning checkpoint
that the damage tests copy and then truncate, swap or delete.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ktm.io
from ktm.cli import main
from ktm.errors import KTMError, check_count, check_share
from ktm.io import sha256_file, verify, write_json

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = ["--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=16", "--data.max_val_examples=8",
             "--data.max_test_examples=8", "--data.batch_size=8", "--data.eval_batch_size=8",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.max_epochs=1"]
FAST_FAIL = ["fit", "--exp", "tree_k4", "--model.base=config:tiny-llama", "--model.ks=[1,4]", "--data.k_schedule=[1,4]"]


@pytest.fixture(autouse=True)
def _lightning_logs_to_current_stderr():
    """Lightning's log handlers keep the stderr of the test that first imported it (a closed capture
    file later); point them at this test's stderr so its INFO lines do not turn into logging errors."""
    import lightning.pytorch  # noqa: F401  (creates the handlers now, so they can be re-pointed)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(sys.stderr)


def error_line(capsys) -> str:
    """The one `ktm: error:` line of a failed command; no traceback, no usage dump."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ktm: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert " -> " in errors[0], errors[0]  # problem -> fix
    return errors[0]


def save_tiny_base(folder: Path, seed: int) -> Path:
    """The tiny config-built Llama written as a plain HF folder (weights seeded: another seed = another base)."""
    from ktm.base import config_base

    model, tokenizer = config_base("tiny-llama", torch.float32, seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny fit on a local-folder base: (root, run dir, base A, base B with other weights)."""
    import ktm.benchmarks.common as common

    tmp = tmp_path_factory.mktemp("trained")
    base_a, base_b = save_tiny_base(tmp / "base_a", 0), save_tiny_base(tmp / "base_b", 1)
    root = tmp / "runs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DATA_DIR", tmp / "data")
        code = main(["fit", "--exp", "tree_k4", "--root", str(root), "--run", "r", f"--model.base={base_a}",
                     "--model.ks=[1,2]", "--data.k_schedule=[1,2]", *TINY_DATA])
    assert code == 0
    return root, root / "tree_k4" / "r", base_a, base_b


def copy_run(trained, tmp_path) -> Path:
    """A private copy of the trained run whose config.yaml points at the copy (so resuming writes there)."""
    root, run, _, _ = trained
    new_root = tmp_path / "runs"
    shutil.copytree(root, new_root)
    cfg = new_root / "tree_k4" / "r" / "config.yaml"
    cfg.write_text(cfg.read_text().replace(str(root), str(new_root)))  # an edit: its checksum now differs
    return new_root / "tree_k4" / "r"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# -- command line and config ------------------------------------------------------------------------


def test_unknown_experiment_lists_the_available_ones(capsys):
    assert main(["fit", "--exp", "nope"]) == 2
    line = error_line(capsys)
    assert "unknown experiment 'nope'" in line and "use one of:" in line and "tree_k4" in line


def test_unknown_key_is_one_line_with_a_suggestion(capsys):
    assert main([*FAST_FAIL, "--model.kss=[1,2]"]) == 2
    line = error_line(capsys)
    assert line.startswith("ktm: error: unknown option --model.kss=[1,2] -> did you mean --model.ks?"), line


def test_prefix_of_a_key_is_not_silently_accepted(capsys):
    # argparse would read --model.keep as --model.keep_tail (prefix matching): a typo must be an error
    assert main([*FAST_FAIL, "--model.keep=3"]) == 2
    assert "unknown option --model.keep=3 -> did you mean --model.keep_tail?" in error_line(capsys)


def test_unknown_key_in_a_config_file(tmp_path, capsys):
    cfg = tmp_path / "extra.yaml"
    cfg.write_text("model:\n  bogus_setting: 3\n")
    assert main([*FAST_FAIL, "--config", str(cfg)]) == 2
    assert "unknown option model.bogus_setting (in a config file)" in error_line(capsys)


def test_wrong_type_names_key_value_and_type(capsys):
    assert main([*FAST_FAIL, "--data.batch_size=abc"]) == 2
    assert "bad value for data.batch_size: 'abc' is not a whole number -> set data.batch_size to a whole number" in error_line(capsys)
    assert main([*FAST_FAIL, "--data.advance_metric=f1"]) == 2
    assert "'f1' is not one of 'accuracy', 'balanced_accuracy'" in error_line(capsys)


def test_bad_yaml_and_missing_config_file(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("model: [1\n")
    assert main([*FAST_FAIL, "--config", str(cfg)]) == 2
    assert "cannot parse the config" in error_line(capsys)
    assert main([*FAST_FAIL, "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file problem: File does not exist" in error_line(capsys)


def test_help_still_works(capsys):
    assert main(["fit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--model.ks" in out and "--checkpoint.every_n_train_steps" in out


@pytest.mark.parametrize("value,minimum,allow_none,message", [
    (0, 1, False, "n must be a whole number >= 1, got 0"),
    (True, 0, False, "n must be a whole number >= 0, got True"),  # a bool is not a count
    (2.0, 1, False, "n must be a whole number >= 1, got 2.0"),
    ("3", 1, False, "n must be a whole number >= 1, got '3'"),
    (None, 1, False, "n must be a whole number >= 1, got None"),
    (-1, 0, True, "n must be a whole number >= 0 or null, got -1"),
    (1, 1, False, None), (0, 0, False, None), (None, 1, True, None),
])
def test_check_count_is_the_one_rule_for_counts(value, minimum, allow_none, message):
    if message is None:
        check_count("n", value, minimum, "fix it", allow_none=allow_none)
        return
    with pytest.raises(KTMError) as err:
        check_count("n", value, minimum, "fix it", allow_none=allow_none)
    assert (err.value.problem, err.value.fix) == (message, "fix it")


@pytest.mark.parametrize("value,ok", [(0, True), (1, True), (0.3, True), (-0.1, False), (1.5, False), (True, False),
                                      ("0.5", False), (None, False), (float("nan"), False), (float("inf"), False)])
def test_check_share_is_the_one_rule_for_shares(value, ok):
    if ok:
        check_share("s", value, "fix it")
        return
    with pytest.raises(KTMError) as err:
        check_share("s", value, "fix it")
    assert (err.value.problem, err.value.fix) == (f"s must be a number in [0, 1], got {value!r}", "fix it")


@pytest.mark.parametrize("arg,message", [
    ("--model.ks=[0,2]", "K must be a whole number >= 1, got 0"),
    ("--model.ks=[-4]", "K must be a whole number >= 1, got -4"),
    ("--model.ks=[1.5]", "bad value for model.ks: '1.5' is not a whole number"),
    ("--model.ks=[]", "model.ks must be a non-empty list of K values, got []"),
    ("--model.ks=4", "bad value for model.ks: '4' is not a list"),
    ("--model.encoder_multiplier=0.1", "model.encoder_multiplier=0.1 gives the K=4 merge encoder no hidden units (int(0.1*4) = 0)"),
    ("--model.encoder_multiplier=-1", "model.encoder_multiplier must be a number > 0, got -1.0"),
    ("--model.encoder_shape=deep", "model.encoder_shape must be one of paper, shallow, got 'deep'"),
    ("--model.merged_positions=stretched", "model.merged_positions must be one of compact, spread, got 'stretched'"),
    ("--model.ks=[100000]", "model.ks has K=100000: its merge encoder would have"),
    ("--model.keep_tail=-1", "keep_tail must be a whole number >= 0, got -1"),
    ("--model.lr_lora=-0.1", "model.lr_lora must be a number >= 0, got -0.1"),
    ("--model.lora.dropout=1.5", "model.lora.dropout must be in [0, 1), got 1.5"),
    ("--data.k_schedule=[0]", "data.k_schedule has an invalid K 0"),
    ("--data.k_schedule=[1,[2,0]]", "data.k_schedule has an invalid K 0"),
    ("--data.k_schedule=[1,[]]", "data.k_schedule has an empty mixed entry"),
    ("--data.max_train_examples=-3", "data.max_train_examples must be a whole number >= 1 or null, got -3"),
    ("--data.train_pool=0", "data.train_pool must be a whole number >= 1 or null, got 0"),
    ("--trainer.max_epochs=-2x", "bad value for trainer.max_epochs: '-2x' is not a whole number or null"),
    # the curriculum moves at each validation: validating every 2 epochs silently halved the K schedule's pace
    ("--trainer.check_val_every_n_epoch=2", "trainer.check_val_every_n_epoch=2: ktm validates once per epoch"),
    ("--trainer.val_check_interval=0.5", "trainer.val_check_interval=0.5: ktm validates once per epoch"),
    ("--trainer.limit_val_batches=0", "trainer.limit_val_batches=0: without validation the K curriculum never moves"),
])
def test_bad_settings_are_one_line(arg, message, capsys):
    assert main([*FAST_FAIL, arg]) == 2
    assert message in error_line(capsys)


def test_settings_are_checked_before_the_base_is_loaded(monkeypatch):
    import ktm.base
    from ktm.model import KTMModel

    def must_not_load(*args, **kwargs):
        raise AssertionError("the base was loaded before the settings were checked")

    monkeypatch.setattr(ktm.base, "load_base", must_not_load)
    for kwargs, message in [({"ks": [2.5]}, "K must be a whole number >= 1, got 2.5"),
                            ({"ks": [2], "keep_tail": -2}, "keep_tail must be a whole number >= 0"),
                            ({"ks": [2, 4], "encoder_multiplier": 0.3}, "gives the K=2 merge encoder no hidden units"),
                            ({"ks": [2], "long_prompt_policy": "cut"}, "unknown long_prompt_policy 'cut'")]:
        with pytest.raises(KTMError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            KTMModel.from_base("config:tiny-llama", **kwargs)


def test_generate_bad_arguments_are_one_line(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path), "--k", "0", "hi"]) == 2
    assert "K must be a whole number >= 1, got 0" in error_line(capsys)
    assert main(["generate", "hi"]) == 2
    assert "the following arguments are required: --ckpt" in error_line(capsys)
    assert main(["generate", "--ckpt", str(tmp_path), "--top-p", "0", "hi"]) == 2
    assert "--top-p must be in (0, 1], got 0.0" in error_line(capsys)


# -- base models --------------------------------------------------------------------------------------


def test_base_that_does_not_exist(capsys):
    assert main([*FAST_FAIL, "--model.base=./no/such/folder"]) == 2
    assert "base model './no/such/folder' is neither a local folder nor a hub id" in error_line(capsys)


def test_base_that_is_not_a_causal_lm(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    folder = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=100)).save_pretrained(folder)
    assert main(["fit", "--exp", "tree_k4", f"--model.base={folder}"]) == 2
    assert "is a 'bert' model, not a causal (decoder-only) LM -> use a causal LM" in error_line(capsys)


def test_hub_only_base_with_the_hub_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "KTM_DATA": str(tmp_path / "data"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "ktm.cli", "fit", "--exp", "tree_k4", "--root", str(tmp_path / "runs"),
                           "--model.base=some-org/some-model"], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr
    assert lines[-1] == ("ktm: error: base model 'some-org/some-model' is not in the local Hugging Face cache and the hub "
                         "is switched off (HF_HUB_OFFLINE=1) -> unset HF_HUB_OFFLINE on a machine with network, or download "
                         "the model and set model.base to its folder")


# -- data files -----------------------------------------------------------------------------------------


def commit_row(i: int, old: str | None = None) -> dict:
    return {"repo": f"r{i}", "path": f"f{i}.py", "subject": f"Fix {i}", "old_contents": old or f"x = {i}\n",
            "new_contents": f"x = {i + 1}\n"}


def commitpack_args(folder: Path) -> list[str]:
    return ["fit", "--exp", "tree_k4", "--model.base=config:tiny-llama", "--root", str(folder / "runs"),
            "--data.benchmark=commitpack", "--data.stages=null", "--data.k_schedule=null", "--model.ks=[1]",
            "--data.max_train_examples=null", "--data.batch_size=8", "--trainer.enable_progress_bar=false",
            f"--data.benchmark_args={{source: jsonl, data_dir: {folder / 'commits'}}}"]


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("case,message", [
    ("missing", "commitpack train file {dir}/train.jsonl does not exist -> check the path in your config"),
    ("empty", "commitpack train file {dir}/train.jsonl is empty"),
    ("not_jsonl", "commitpack train file {dir}/train.jsonl line 2 is not JSON"),
    ("no_field", "commitpack train file {dir}/train.jsonl line 3 lacks required field(s) new_contents -> every row needs: subject, old_contents, new_contents"),
])
def test_bad_data_files_name_the_file_line_and_field(case, message, tmp_path, capsys):
    folder = tmp_path / "commits"
    folder.mkdir()
    write_lines(folder / "test.jsonl", [json.dumps(commit_row(i)) for i in range(4)])
    rows = [json.dumps(commit_row(i)) for i in range(10, 16)]
    if case == "empty":
        write_lines(folder / "train.jsonl", [])
    elif case == "not_jsonl":
        write_lines(folder / "train.jsonl", [rows[0], "old_contents: not json", *rows[1:]])
    elif case == "no_field":
        bad = commit_row(99)
        del bad["new_contents"]
        write_lines(folder / "train.jsonl", [rows[0], rows[1], json.dumps(bad), *rows[2:]])
    assert main(commitpack_args(tmp_path)) == 2
    assert message.format(dir=folder) in error_line(capsys)


def test_prompt_longer_than_the_context(tmp_path, capsys):
    folder = tmp_path / "commits"
    write_lines(folder / "test.jsonl", [json.dumps(commit_row(i)) for i in range(4)])
    long_file = "".join(f"line_{i} = {i}\n" for i in range(300))  # ~3,700 byte tokens > the 2,048 context
    write_lines(folder / "train.jsonl", [json.dumps(commit_row(i, long_file if i == 12 else None)) for i in range(10, 16)])
    assert main(commitpack_args(tmp_path)) == 2
    line = error_line(capsys)
    # Found before the first training step, with how many and the longest, not on the first such batch.
    assert "1 of 5 train prompts of data stage 'all' are longer than the limit of 2048 tokens (longest " in line
    assert "-> raise model.max_prompt_tokens, set model.long_prompt_policy=truncate_left (counted)" in line


def test_long_prompt_policy_error_and_truncate_left(tmp_path, capsys):
    args = ["fit", "--exp", "tree_k4", "--model.base=config:tiny-llama", "--root", str(tmp_path / "runs"),
            "--model.ks=[2]", "--data.k_schedule=[2]", "--model.max_prompt_tokens=40", *TINY_DATA]
    assert main([*args, "--run", "err"]) == 2
    assert "train prompts of data stage 'small' are longer than the limit of 40 tokens" in error_line(capsys)
    assert not list((tmp_path / "runs" / "tree_k4" / "err").rglob("*.ckpt"))  # refused before training
    assert main([*args, "--run", "cut", "--model.long_prompt_policy=truncate_left"]) == 0
    metrics = json.loads((tmp_path / "runs" / "tree_k4" / "cut" / "metrics.json").read_text())
    assert metrics["truncated_prompts"] >= 16  # every tree prompt is longer than 40 tokens; none silent
    assert metrics["model"]["max_prompt_tokens"] == 40


# -- exported model folders (ktm generate --ckpt) -------------------------------------------------------


def export_copy(trained, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(trained[1] / "export", dst)
    return dst


def test_generate_from_the_export_works_and_refuses_an_empty_prompt(trained, tmp_path, capsys):
    export = export_copy(trained, tmp_path)
    assert main(["generate", "--ckpt", str(export), "--max-new-tokens", "2", "Tree: ab, Answer: "]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(export), "ok", ""]) == 2
    assert "prompt #1 is empty -> give every example a non-empty prompt" in error_line(capsys)


@pytest.mark.parametrize("name", ["encoder.safetensors", "adapter/adapter_model.safetensors", "ktm.json", "adapter/adapter_config.json"])
def test_truncated_export_files_are_refused(name, trained, tmp_path, capsys):
    export = export_copy(trained, tmp_path)
    truncate(export / name)
    assert main(["generate", "--ckpt", str(export), "hi"]) == 2
    line = error_line(capsys)
    assert f"{export / name} is truncated or corrupt (sha256" in line and "-> delete it and re-run" in line


def test_missing_export_files_and_folders(trained, tmp_path, capsys):
    export = export_copy(trained, tmp_path)
    (export / "adapter" / "adapter_config.json").unlink()
    assert main(["generate", "--ckpt", str(export), "hi"]) == 2
    assert f"LoRA adapter file {export / 'adapter' / 'adapter_config.json'} is missing" in error_line(capsys)
    Path(str(export / "encoder.safetensors") + ".sha256").unlink()
    shutil.copytree(trained[1] / "export" / "adapter", export / "adapter", dirs_exist_ok=True)
    assert main(["generate", "--ckpt", str(export), "hi"]) == 2
    assert "encoder.safetensors has no recorded checksum (encoder.safetensors.sha256 is missing), so it may be partial" in error_line(capsys)
    assert main(["generate", "--ckpt", str(tmp_path / "nope"), "hi"]) == 2
    assert f"checkpoint folder {tmp_path / 'nope'} does not exist" in error_line(capsys)


def test_export_cut_between_the_two_renames_points_at_the_previous_copy(trained, tmp_path, capsys):
    export = export_copy(trained, tmp_path)
    previous = tmp_path / ".export.old-abc123"
    os.replace(export, previous)  # what a crash between `export -> .old` and `new -> export` leaves
    assert main(["generate", "--ckpt", str(export), "hi"]) == 2
    assert f"a save was interrupted and left the previous export in {previous} -> rename it back" in error_line(capsys)


def test_export_with_another_k_or_another_base(trained, tmp_path, capsys):
    from ktm.model import KTMModel, LoraSettings

    _, _, base_a, base_b = trained
    export = export_copy(trained, tmp_path)
    assert main(["generate", "--ckpt", str(export), "--k", "3", "hi"]) == 2
    assert "this model has no encoder for K=3 (it has K in [1, 2])" in error_line(capsys)
    # an encoder file (with a valid checksum) from a model with another K
    other = KTMModel.from_base(str(base_a), ks=[1, 4], lora=LoraSettings(r=4)).save(tmp_path / "other")
    for suffix in ("", ".sha256"):
        shutil.copy(other / f"encoder.safetensors{suffix}", export / f"encoder.safetensors{suffix}")
    assert main(["generate", "--ckpt", str(export), "hi"]) == 2
    assert "do not fit K=[1, 2]" in error_line(capsys)
    # the right files, but loaded on a base with other weights
    export = export_copy(trained, tmp_path / "again")
    assert main(["generate", "--ckpt", str(export), "--base", str(base_b), "hi"]) == 2
    line = error_line(capsys)
    assert f"was trained on base {str(base_a)!r} (weights {sha256_file(base_a / 'model.safetensors')[:12]}" in line
    assert f"-> load it with the base it was trained on ({base_a})" in line


# -- Lightning checkpoints (resume, test) ---------------------------------------------------------------


def test_missing_and_damaged_training_checkpoints(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    cfg, ckpts = str(run / "config.yaml"), run / "checkpoints"
    assert main(["fit", "--config", cfg, "--ckpt_path", str(ckpts / "nope.ckpt")]) == 2
    line = error_line(capsys)
    assert f"training checkpoint {ckpts / 'nope.ckpt'} does not exist -> checkpoints in {ckpts}:" in line and "last.ckpt" in line
    epoch_file = next(p for p in ckpts.glob("epoch=*.ckpt"))
    truncate(epoch_file)
    assert main(["test", "--config", cfg, "--ckpt_path", str(epoch_file)]) == 2
    assert "is truncated or corrupt (sha256" in error_line(capsys)
    Path(str(epoch_file) + ".sha256").unlink()  # a copy without its checksum: torch.load itself fails
    assert main(["test", "--config", cfg, "--ckpt_path", str(epoch_file)]) == 2
    line = error_line(capsys)
    assert f"training checkpoint {epoch_file} is truncated or corrupt (" in line and "sha256" not in line
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    assert main(["fit", "--config", cfg, "--ckpt_path", str(foreign)]) == 2
    assert "was not written by ktm (no 'ktm' metadata)" in error_line(capsys)


def test_a_run_branched_from_a_checkpoint_trains_with_its_own_learning_rates(trained, tmp_path):
    # LightningCLI let the checkpoint's hyperparameters override the command line: this branch trained with the
    # old lr, and its config.yaml said so, silently.
    run = copy_run(trained, tmp_path)
    assert main(["fit", "--config", str(run / "config.yaml"), "--run", "branch", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                 "--trainer.max_epochs=2", "--model.lr_lora=0.0123", "--model.lr_encoder=0.0456"]) == 0
    ckpt = torch.load(run.parent / "branch" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and ckpt["hyper_parameters"]["lr_lora"] == 0.0123
    assert {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]} == {"lora": 0.0123, "encoder": 0.0456}
    assert "lr_lora: 0.0123" in (run.parent / "branch" / "config.yaml").read_text()


def test_checkpoint_of_another_k_or_base_is_refused_by_name(trained, tmp_path, capsys):
    _, run, base_a, base_b = trained
    ckpt = str(run / "checkpoints" / "last.ckpt")
    common = ["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--ckpt_path", ckpt, *TINY_DATA]
    assert main([*common, f"--model.base={base_a}", "--model.ks=[1,4]", "--data.k_schedule=[1,4]"]) == 2
    line = error_line(capsys)
    assert "the checkpoint's model.ks is [1, 2], but the config asks for [1, 4]" in line
    assert "-> resume with the run's own config" in line
    assert main([*common, f"--model.base={base_b}", "--model.ks=[1,2]", "--data.k_schedule=[1,2]"]) == 2
    assert f"the checkpoint's model.base is {base_a}, but the config asks for {base_b}" in error_line(capsys)


def test_edited_run_config_is_reported(trained, tmp_path, capsys, caplog):
    run = copy_run(trained, tmp_path)  # copy_run edits config.yaml (paths), so its checksum differs
    logging.getLogger("ktm").addHandler(caplog.handler)
    try:
        assert main(["fit", "--config", str(run / "config.yaml"), "--data.batch_size=0"]) == 2
    finally:
        logging.getLogger("ktm").removeHandler(caplog.handler)
    assert "was changed after ktm wrote it (checksum differs)" in caplog.text
    assert "data.batch_size must be a whole number >= 1, got 0" in error_line(capsys)


# -- full disk --------------------------------------------------------------------------------------------


REAL_WRITE = ktm.io._write_file


def disk_full(match: str):
    real = REAL_WRITE

    def write(path: Path, data: bytes) -> None:
        if match in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    return write


def test_disk_full_while_exporting_keeps_the_previous_export(trained, tmp_path, monkeypatch):
    from ktm.model import KTMModel

    export = export_copy(trained, tmp_path)
    before = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    model = KTMModel.from_pretrained(export)
    with torch.no_grad():
        next(model.encoders["2"].parameters()).add_(1.0)  # a different model: a mixed save would show
    for target in ("encoder.safetensors", "ktm.json"):
        monkeypatch.setattr(ktm.io, "_write_file", disk_full(target))
        with pytest.raises(KTMError) as exc:
            model.save(export)
        assert str(exc.value).startswith(f"disk full while writing {export} (nothing was replaced")
        assert "(nothing was replaced; the previous version, if any, is intact) -> free some space" in str(exc.value)
        after = {p.relative_to(export): p.read_bytes() for p in export.rglob("*") if p.is_file()}
        assert after == before
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # no temp folders left
    monkeypatch.undo()
    KTMModel.from_pretrained(export)  # still loads


def test_disk_full_while_checkpointing_keeps_last_ckpt(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    monkeypatch.setattr(ktm.io, "_write_file", disk_full(".ckpt"))
    code = main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", str(last), "--trainer.max_epochs=2"])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith(f"ktm: error: disk full while writing {run / 'checkpoints'}") and ".ckpt (nothing was replaced" in line
    assert last.read_bytes() == before and verify(last, "checkpoint")
    assert not list((run / "checkpoints").glob(".*.tmp"))


# -- caches and run files -----------------------------------------------------------------------------------


def test_damaged_or_stale_data_caches_are_rebuilt(caplog):
    from ktm.benchmarks import get_benchmark
    from ktm.benchmarks.tree import TreeBenchmark

    logging.getLogger("ktm").addHandler(caplog.handler)
    try:
        bench = get_benchmark("tree", n_trees=60)
        first = bench.load("small")
        folder = bench.cache_path("small")
        truncate(folder / "train.jsonl")
        again = bench.load("small")
        assert "is unusable" in caplog.text and "train.jsonl is truncated or corrupt" in caplog.text
        assert [e.prompt for e in again.train] == [e.prompt for e in first.train]
        verify(folder / "train.jsonl")  # rewritten whole, with its checksum
        # meta.json of the same folder, but written for other settings: rebuilt, not reused
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["options"] = {"n_trees": 61}
        write_json(folder / "meta.json", meta)
        caplog.clear()
        bench.load("small")
        assert f"data cache {folder} was made by other settings; rebuilding it" in caplog.text
        # a new benchmark version never reads an old cache: other key, other folder
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(TreeBenchmark, "version", TreeBenchmark.version + "-next")
            assert bench.cache_path("small") != folder
            bench.load("small")
            assert (bench.cache_path("small") / "meta.json").exists()
    finally:
        logging.getLogger("ktm").removeHandler(caplog.handler)


def test_unreadable_metrics_json_is_kept_aside_not_fatal(trained, tmp_path, caplog):
    run = copy_run(trained, tmp_path)
    truncate(run / "metrics.json")
    damaged = (run / "metrics.json").read_bytes()
    logging.getLogger("ktm").addHandler(caplog.handler)
    try:
        assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")]) == 0
    finally:
        logging.getLogger("ktm").removeHandler(caplog.handler)
    aside = list(run.glob("metrics.unreadable-*.json"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert "metrics file" in caplog.text and "moved it to" in caplog.text
    assert "k2" in json.loads(verify(run / "metrics.json").read_text())["test"]


def test_damaged_converted_base_is_refused(tmp_path, capsys):
    """A converted base folder (like the embedded SmolLM2's) carries a manifest of sha256s: a damaged
    weights file is named, with the fix, instead of loading wrong weights."""
    from ktm.base import MANIFEST, _hash_folder

    folder = save_tiny_base(tmp_path / "converted", 0)
    files = _hash_folder(folder)
    write_json(folder / MANIFEST, {"source": "test", "weights_sha256": files["model.safetensors"], "files": files}, checksum=False)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-8] + bytes(8))  # same size, last bytes zeroed
    assert main([*FAST_FAIL, f"--model.base={folder}", "--root", str(tmp_path / "runs")]) == 2
    line = error_line(capsys)
    assert f"converted base model in {folder} is corrupt or partial (model.safetensors do not match the manifest)" in line
    assert f"-> delete {folder} and run again to re-convert it" in line
