"""The curriculum state machine (ktm/training/curriculum.py) on plain numbers: no benchmark, no model."""

from __future__ import annotations

import json
import subprocess
import sys

from ktm.training.curriculum import Curriculum


def ba(value: float) -> dict[str, float]:
    return {"balanced_accuracy": value}


def test_stages_advance_on_the_threshold_or_after_max_rounds_and_the_last_one_finishes():
    c = Curriculum(["a", "b", "c"], k_schedule=[1, 2, 4], k_advance="stage", advance_threshold=0.85,
                   final_threshold=0.95, max_rounds=2)
    assert (c.stage, c.stage_index, c.current_k(4)) == ("a", 0, 1)
    assert c.after_validation(ba(0.5), 1) == [] and c.stage == "a"
    assert c.after_validation(ba(0.9), 1) == ["advancing to stage b (balanced_accuracy 0.900 >= 0.85)"]
    assert (c.stage, c.rounds_in_stage, c.current_k(4)) == ("b", 0, 2)
    assert c.after_validation(ba(0.1), 2) == []
    assert c.after_validation(ba(0.1), 2) == ["advancing to stage c (max_rounds=2 reached)"]
    assert (c.stage, c.current_k(4)) == ("c", 4)
    assert c.after_validation(ba(0.94), 4) == [] and not c.finished  # the last stage needs final_threshold
    assert c.after_validation(ba(0.96), 4) == ["stage c: balanced_accuracy 0.960 >= 0.95 at K=4; curriculum done"]
    assert c.finished and c.epochs_done == 6


def test_the_last_stage_never_moves_on_after_max_rounds():
    c = Curriculum(["only"], max_rounds=1)
    for _ in range(3):
        assert c.after_validation(ba(0.0), 1) == []
    assert (c.stage_index, c.rounds_in_stage, c.finished) == (0, 3, False)


def test_the_chosen_metric_decides_and_a_missing_one_never_reaches_the_threshold():
    c = Curriculum(["a", "b"], advance_metric="accuracy", max_rounds=1)
    assert c.after_validation(ba(1.0), 1) == ["advancing to stage b (max_rounds=1 reached)"]
    c.after_validation(ba(1.0), 1)
    assert not c.finished
    c.after_validation({"accuracy": 0.99}, 1)
    assert c.finished


def test_training_does_not_finish_before_the_last_k():
    c = Curriculum(["s"], k_schedule=[1, 4], final_threshold=0.9)
    assert not c.k_schedule_done()
    c.after_validation(ba(1.0), 1)  # K=1 epoch: perfect, but K=4 has not run
    assert not c.finished and c.current_k(4) == 4 and c.k_schedule_done()
    c.after_validation(ba(0.95), 4)
    assert c.finished


def test_k_advances_by_epoch():
    c = Curriculum(["s"], k_schedule=[1, 2, 4], epochs_per_k=2)
    ks = []
    for _ in range(7):
        ks.append(c.current_k(4))
        c.after_validation(ba(0.0), ks[-1])
    assert ks == [1, 1, 2, 2, 4, 4, 4]  # the last K stays


def test_k_advances_with_the_stage_not_the_epoch():
    c = Curriculum(["a", "b", "c"], k_schedule=[1, 2], k_advance="stage", max_rounds=3)
    c.after_validation(ba(0.0), 1)
    c.after_validation(ba(0.0), 1)
    assert (c.stage, c.current_k(4), c.k_schedule_done()) == ("a", 1, False)  # two epochs, same stage, same K
    c.after_validation(ba(0.9), 1)
    assert (c.stage, c.current_k(4), c.k_schedule_done()) == ("b", 2, True)
    c.after_validation(ba(0.9), 2)
    assert (c.stage, c.current_k(4)) == ("c", 2)  # past the schedule's end the last K stays


def test_a_mixed_entry_cycles_by_global_step_and_is_judged_by_its_largest_k():
    c = Curriculum(["s"], k_schedule=[1, (1, 2, 4)])
    assert c.k_schedule == [1, [1, 2, 4]]  # tuples become lists (the run info is JSON)
    assert c.schedule_ks() == [1, 2, 4] and c.current_ks(4) == [1]
    assert [c.train_k(step, 4) for step in range(3)] == [1, 1, 1]
    c.after_validation(ba(0.0), 1)
    assert c.current_ks(4) == [1, 2, 4]
    assert [c.train_k(step, 4) for step in range(100, 106)] == [2, 4, 1, 2, 4, 1]  # global step, not batch index
    assert c.current_k(4) == 4


def test_a_k_repeated_in_a_mixed_entry_gets_that_share_of_the_steps():
    c = Curriculum(["s"], k_schedule=[[1, 2, 4, 4, 8]])  # the weights of read_k1248's comment: K=4 two steps in five
    assert c.schedule_ks() == [1, 2, 4, 8] and c.current_k(1) == 8
    counts = {k: [c.train_k(step, 1) for step in range(1000)].count(k) for k in (1, 2, 4, 8)}
    assert counts == {1: 200, 2: 200, 4: 400, 8: 200}


def test_without_a_schedule_the_default_k_is_used_and_only_the_threshold_finishes():
    c = Curriculum(["s"])
    assert c.k_schedule == [] and c.schedule_ks() == []
    assert (c.current_ks(4), c.current_k(2), c.train_k(7, 4), c.k_schedule_done()) == ([4], 2, 4, True)
    c.after_validation(ba(0.95), 4)
    assert c.finished


def test_state_round_trips_in_the_checkpoint_format_and_a_resumed_curriculum_goes_on_the_same_way():
    settings = dict(stages=["a", "b", "c"], k_schedule=[1, 2, 4], epochs_per_k=2, max_rounds=2)
    c = Curriculum(**settings)
    for _ in range(3):
        c.after_validation(ba(0.0), c.current_k(4))
    state = c.state_dict()
    # Exactly these keys: checkpoints of earlier runs hold them, and resuming reads them back.
    assert state == {"stage_index": 1, "rounds_in_stage": 1, "epochs_done": 3, "finished": False}
    assert json.loads(json.dumps(state)) == state  # plain values (the run info JSON embeds them too)
    resumed = Curriculum(**settings)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state and (resumed.stage, resumed.current_k(4)) == ("b", 2)
    for value in (0.0, 0.0, 0.99):
        events = c.after_validation(ba(value), c.current_k(4))
        assert resumed.after_validation(ba(value), resumed.current_k(4)) == events
        assert resumed.state_dict() == c.state_dict()
    assert resumed.finished


def test_the_curriculum_imports_no_lightning_torch_or_benchmark():
    code = ("import sys, ktm.training.curriculum; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch') or m.startswith('ktm.benchmarks')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
