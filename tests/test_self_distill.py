"""Task-time distillation from the model itself at K=1 (model.distill_teacher: k1) and the hidden-state match
(model.distill_hidden_weight). Tiny config-built models, plus one tiny fit through the CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ktm.cli import main
from ktm.errors import KTMError
from ktm.model import LoraSettings, teacher_positions
from ktm.training.module import KTMModule, hidden_gap

PROMPTS, TARGETS = ["Tree: ab\n+cd, Answer: ", "x y z w v u"], ["true", "some longer target"]


def _module(**kw):
    torch.manual_seed(0)
    m = KTMModule(base="config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=4, dropout=0.0), **kw)
    for name, p in m.model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output, so the teachers differ
    return m


def test_the_k1_teacher_is_the_model_itself_reading_the_uncompressed_prompt():
    m = _module()
    ids, tids = m.model.tokenize_prompts(PROMPTS), m.model.tokenize_targets(TARGETS)
    b1 = m.model.build_batch(ids, 1, tids)
    own_logits, own_states = m.model.target_outputs(b1, hidden="targets")
    logits, states = m.model.teacher_outputs(ids, tids, teacher="k1", hidden="targets")
    assert states.shape == (m.model.lm.config.num_hidden_layers, 2, b1.targets.shape[1], m.model.hidden_size)
    assert not logits.requires_grad and not states.requires_grad
    torch.testing.assert_close(logits, own_logits.detach())
    torch.testing.assert_close(states, own_states.detach())
    base_logits, _ = m.model.teacher_outputs(ids, tids, teacher="base")
    mask = b1.targets != -100
    assert not torch.allclose(base_logits[mask], logits[mask], atol=1e-3)  # the bare base is another teacher


def test_hidden_gap_is_zero_for_equal_states_and_relative_per_position():
    torch.manual_seed(0)
    t = torch.randn(3, 5, 8)
    assert float(hidden_gap(t, t)) == pytest.approx(0.0, abs=1e-7)
    s = t.clone()
    s[:, 4] = 0.0  # one position of five with nothing: relative gap 1 there, whatever its norm
    assert float(hidden_gap(s, t)) == pytest.approx(1.0 / 5.0, rel=1e-5)
    assert float(hidden_gap(t[:, :0], t[:, :0])) == 0.0  # nothing scored


@pytest.mark.parametrize("n, k, keep_tail, kept, targets, expected", [
    (8, 4, 0, 0, 0, [3, 7]),                 # two blocks, each matched with its last token
    (9, 4, 0, 0, 2, [0, 4, 8, 9, 10]),       # a head token with itself, then blocks, then the targets
    (10, 4, 1, 2, 1, [0, 1, 2, 6, 7, 8, 9, 10]),  # head 7 % 4 = 3, one block, tail (keep_tail 1 + kept 2)
    (5, 1, 0, 0, 1, [0, 1, 2, 3, 4, 5]),     # K=1: every position with itself
    (3, 4, 0, 0, 1, [0, 1, 2, 3]),           # shorter than a block: all head
])
def test_teacher_positions_match_each_merged_position_with_where_the_uncompressed_model_read_it(n, k, keep_tail, kept, targets, expected):
    assert teacher_positions(n, k, keep_tail, kept, targets) == expected


def test_aligned_positions_pair_every_real_position_of_both_left_padded_batches():
    m = _module()
    ids, tids = m.model.tokenize_prompts(PROMPTS), m.model.tokenize_targets(TARGETS)
    b4, b1 = m.model.build_batch(ids, 4, tids), m.model.build_batch(ids, 1, tids)
    mine, theirs = m.model.aligned_positions(ids, 4, [len(t) for t in tids], None, b4.inputs_embeds.shape[1], b1.inputs_embeds.shape[1])
    assert len(mine) == int(b4.attention_mask.sum()) - 2  # every real position of the merged batch but the first (the sink)
    assert len(set(map(tuple, mine.tolist()))) == len(mine)
    assert bool(b4.attention_mask[mine[:, 0], mine[:, 1]].all()) and bool(b1.attention_mask[theirs[:, 0], theirs[:, 1]].all())
    # the targets are the same embeddings in both
    last = torch.tensor([i == len(mine) - 1 or mine[i + 1, 0] != mine[i, 0] for i in range(len(mine))])
    torch.testing.assert_close(b4.inputs_embeds[mine[last, 0], mine[last, 1]], b1.inputs_embeds[theirs[last, 0], theirs[last, 1]])
    # at K=1 the student is the K=1 teacher position by position: the gap is exactly 0
    _, own = m.model.target_outputs(b1, hidden="all")
    _, teacher = m.model.teacher_outputs(ids, tids, teacher="k1", hidden="all")
    same, same_t = m.model.aligned_positions(ids, 1, [len(t) for t in tids], None, b1.inputs_embeds.shape[1], b1.inputs_embeds.shape[1])
    assert torch.equal(same, same_t)
    assert float(hidden_gap(own[:, same[:, 0], same[:, 1]], teacher[:, same_t[:, 0], same_t[:, 1]])) == pytest.approx(0.0, abs=1e-6)


def test_the_hidden_match_trains_the_encoder_and_lora_but_never_the_teacher_pass():
    m = _module(distill_teacher="k1", distill_hidden_weight=1.0)
    ids, tids = m.model.tokenize_prompts(PROMPTS), m.model.tokenize_targets(TARGETS)
    b = m.model.build_batch(ids, 4, tids)
    _, states = m.model.target_outputs(b, hidden="targets")
    _, teacher = m.model.teacher_outputs(ids, tids, teacher="k1", hidden="targets")
    scored = b.targets != -100
    gap = hidden_gap(states[:, scored], teacher[:, scored])
    assert float(gap) > 0
    gap.backward()
    encoder = m.model.encoders["4"]
    assert encoder.mlp[-1].weight.grad is not None and encoder.mlp[-1].weight.grad.abs().sum() > 0
    lora = [p for n, p in m.model.lm.named_parameters() if "lora_A" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_a_bad_teacher_is_one_clear_line():
    with pytest.raises(KTMError, match="distill_teacher must be base, k1 or an export folder"):
        _module(distill_teacher="")
    with pytest.raises(KTMError, match="distill_temperature must be a number > 0"):
        _module(distill_temperature=0.0)
    with pytest.raises(KTMError, match="distill_hidden_weight must be a number >= 0"):
        _module(distill_hidden_weight=-1.0)
    with pytest.raises(KTMError, match="distill_hidden_at must be one of targets, all"):
        _module(distill_hidden_at="blocks")
    with pytest.raises(KTMError, match="compressor 'truncate_tail' has none"):
        _module(distill_hidden_at="all", distill_hidden_weight=1.0, compressor="truncate_tail")


def _tiny_fit(tmp_path, run: str, *extra: str) -> int:
    args = ["fit", "--exp", "tree_k4", "--root", str(tmp_path / "runs"), "--run", run, "--model.base=config:tiny-llama",
            "--model.ks=[1,2]", "--model.lr_lora=1.0e-3", "--data.k_schedule=[1,2]", "--data.benchmark_args={n_trees: 60}",
            "--data.max_train_examples=16", "--data.max_val_examples=8", "--data.max_test_examples=8", "--data.batch_size=8",
            "--trainer.max_epochs=2", "--trainer.max_time=null", "--trainer.enable_progress_bar=false",
            "--trainer.log_every_n_steps=1", *extra]
    return main(args)


def test_a_tiny_fit_with_self_distillation_logs_the_hidden_gap(tmp_path, monkeypatch):
    import ktm.benchmarks.common as common

    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    assert _tiny_fit(tmp_path, "sd", "--model.distill_teacher=k1", "--model.distill_hidden_weight=1.0", "--model.distill_hidden_at=all") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tree_k4" / "sd"
    acc = EventAccumulator(str(run)).Reload()
    tags = acc.Tags()["scalars"]
    assert "train/k2/distill_hidden" in tags and "train/k2/target_loss" in tags
    assert "train/k1/distill_hidden" not in tags  # K=1 steps have nothing to distil
    gaps = [e.value for e in acc.Scalars("train/k2/distill_hidden")]
    assert all(g > 0 for g in gaps)
    assert json.loads((run / "metrics.json").read_text())["val"]


def test_a_tiny_fit_taught_by_another_run_keeps_the_teacher_out_of_its_checkpoints(tmp_path, monkeypatch):
    import ktm.benchmarks.common as common

    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")
    assert _tiny_fit(tmp_path, "teacher", "--model.ks=[1]", "--data.k_schedule=[1]", "--trainer.max_epochs=1") == 0
    export = tmp_path / "runs" / "tree_k4" / "teacher" / "export"
    assert _tiny_fit(tmp_path, "student", f"--model.distill_teacher={export}", "--model.distill_weight=1.0", "--model.distill_temperature=2.0") == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "runs" / "tree_k4" / "student"
    kl = [e.value for e in EventAccumulator(str(run)).Reload().Scalars("train/k2/distill_kl")]
    assert kl and all(v > 0 for v in kl)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and not any("teacher" in name for name in state)
    shutil.rmtree(export)  # training needed the teacher; testing the student does not
    assert main(["test", "--config", str(run / "config.yaml")]) == 0
    assert _tiny_fit(tmp_path, "again", f"--model.distill_teacher={export}", "--model.distill_weight=1.0") != 0  # one clear line
    assert not (tmp_path / "runs" / "tree_k4" / "again" / "metrics.json").exists()


def test_a_teacher_from_an_export_is_that_trained_model_reading_the_uncompressed_prompt(tmp_path):
    from ktm.model import KTMModel
    from ktm.training.teacher import load_teacher

    trained = _module()  # stands for the task's K=1 reference: adapters that change the output
    trained.model.save(tmp_path / "export")
    m = _module()
    torch.manual_seed(1)
    for name, p in m.model.lm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the student has moved on from where the teacher stopped
    before = torch.get_rng_state()
    teacher = load_teacher(tmp_path / "export", m.model)
    assert torch.equal(torch.get_rng_state(), before)  # the run's seeded stream is where it was
    ids, tids = m.model.tokenize_prompts(PROMPTS), m.model.tokenize_targets(TARGETS)
    logits, states = teacher.teacher_outputs(ids, tids, teacher="k1", hidden="targets")
    want, want_states = KTMModel.from_pretrained(tmp_path / "export").teacher_outputs(ids, tids, teacher="k1", hidden="targets")
    mask = m.model.build_batch(ids, 1, tids).targets != -100
    torch.testing.assert_close(logits[mask], want[mask], atol=1e-4, rtol=1e-4)  # LoRA merged in: equal up to rounding
    torch.testing.assert_close(states, want_states, atol=1e-4, rtol=1e-4)
    own, _ = m.model.teacher_outputs(ids, tids, teacher="k1")
    assert not torch.allclose(own[mask], logits[mask], atol=1e-3)  # not the student's own K=1
    assert all(not p.requires_grad for p in teacher.parameters())


def test_an_export_teacher_on_another_base_or_no_export_is_one_clear_line(tmp_path):
    from ktm.training.teacher import load_teacher

    trained = _module()
    trained.model.save(tmp_path / "export")
    student = _module().model
    student.base_fingerprint = "another-base"
    with pytest.raises(KTMError, match="was trained on another base"):
        load_teacher(tmp_path / "export", student)
    with pytest.raises(KTMError, match="is neither base, k1 nor an export folder"):
        load_teacher(tmp_path / "nothing", student)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distill_kl_at_temperature_t_is_the_plain_kl_of_the_softened_logits_times_t_squared(temperature):
    from ktm.training.module import distill_kl

    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), 5 * torch.randn(2, 3, 11)
    targets = torch.tensor([[1, -100, 2], [3, 4, -100]])
    plain = distill_kl(s / temperature, t / temperature, targets)
    assert float(distill_kl(s, t, targets, temperature)) == pytest.approx(float(plain) * temperature**2, rel=1e-5)
    assert float(distill_kl(t, t, targets, temperature)) == pytest.approx(0.0, abs=1e-5)
