"""TensorBoard's views to compare K (ktm.training.callbacks.TensorBoardViews), read back through TensorBoard's own
plugins on a tiny fit + test + validate: the Custom Scalars layout (one chart per metric, one line per K), one
TensorBoard run per K, HParams with the final val/test numbers, test/validate points at the trained step (never
step 0, no `epoch` point of their own), no `val_stage/...` with a single data stage; and the back-fill of old runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ktm.cli import main

TINY = ["--model.base=config:tiny-llama", "--data.benchmark_args={n_trees: 120}", "--data.max_train_examples=32",
        "--data.max_val_examples=16", "--data.max_test_examples=16", "--data.batch_size=8", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1"]
COUNTS = {"examples"}  # counts get no chart


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(logdir, run folder, metrics.json) of one tiny fit at K=1 then K=2 (one data stage), its test and a validate."""
    import ktm.benchmarks.common as common

    tmp = tmp_path_factory.mktemp("tb")
    root = tmp / "runs"
    run = root / "tree_k4" / "r1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "DATA_DIR", tmp / "data")
        assert main(["fit", "--exp", "tree_k4", "--root", str(root), "--run", "r1", "--trainer.max_epochs=2", *TINY,
                     "--model.ks=[1,2]", "--data.k_schedule=[1,2]", "--data.stages=[small]"]) == 0
        last = str(run / "checkpoints" / "last.ckpt")
        assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", last]) == 0
        assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", last]) == 0
    return root, run, json.loads((run / "metrics.json").read_text())


class Board:
    """TensorBoard's scalars, custom-scalars and hparams plugins on a logdir, asked as the browser asks them."""

    def __init__(self, logdir: Path):
        from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
        from tensorboard.plugins.hparams.hparams_plugin import HParamsPlugin
        from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin

        self.mux = plugin_event_multiplexer.EventMultiplexer()
        self.mux.AddRunsFromDirectory(str(logdir))
        self.mux.Reload()
        self.provider = data_provider.MultiplexerDataProvider(self.mux, str(logdir))
        ctx = base_plugin.TBContext(logdir=str(logdir), multiplexer=self.mux, data_provider=self.provider, plugin_name_to_instance={})
        ctx.plugin_name_to_instance["scalars"] = ScalarsPlugin(ctx)
        self.custom, self.hparams = CustomScalarsPlugin(ctx), HParamsPlugin(ctx)

    @staticmethod
    def _ask(plugin, route: str, body: dict | None = None, **query):
        from werkzeug.test import Client
        from werkzeug.wrappers import Response

        client = Client(plugin.get_plugin_apps()[route], Response)
        reply = client.post(route, data=json.dumps(body)) if body is not None else client.get(route, query_string=query)
        assert reply.status_code == 200, reply.get_data(as_text=True)[:300]
        return json.loads(reply.get_data())

    def layout(self) -> dict:
        return self._ask(self.custom, "/layout")

    def matching(self, run: str, regex: str) -> dict[str, list]:
        return self._ask(self.custom, "/scalars", run=run, tag=regex)["tag_to_events"]

    def experiment(self) -> dict:
        return self._ask(self.hparams, "/experiment", {"experimentName": ""})

    def session_groups(self) -> list[dict]:
        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        return self._ask(self.hparams, "/session_groups", {"experimentName": "", "allowedStatuses": statuses, "colParams": [],
                                                            "startIndex": 0, "sliceSize": 100})["sessionGroups"]

    def scalars(self, run: str) -> dict[str, list[tuple[int, float]]]:
        from tensorboard import context
        from tensorboard.data import provider

        data = self.provider.read_scalars(context.RequestContext(), experiment_id="", plugin_name="scalars", downsample=10_000,
                                          run_tag_filter=provider.RunTagFilter(runs=[run]))
        return {tag: [(p.step, p.value) for p in points] for tag, points in data.get(run, {}).items()}


def test_custom_scalars_has_one_chart_per_metric_with_a_line_per_k(board):
    root, run, metrics = board
    tb = Board(root)
    categories = {c["title"].split(":")[0]: c["chart"] for c in tb.layout()["category"]}
    assert list(categories) == ["val", "test", "train", "speed"]
    for split in ("val", "test"):
        names = [n for n in metrics[split]["k1"] if n not in COUNTS]
        charts = {c["title"]: c["multiline"]["tag"] for c in categories[split]}
        assert sorted(charts) == sorted(f"{split}/{n}" for n in names)  # one chart per metric
        assert list(charts)[0] == f"{split}/balanced_accuracy"  # the headline metric first
        for name in names:
            (regex,) = charts[f"{split}/{name}"]
            for k in (1, 2):  # every K is a line: its own TensorBoard run, so its own colour
                events = tb.matching(f"tree_k4/r1/by_k/k{k}", regex)
                assert list(events) == [f"{split}/{name}"], (regex, k)
                assert events[f"{split}/{name}"][-1][2] == pytest.approx(metrics[split][f"k{k}"][name], rel=1e-6)
            assert tb.matching("tree_k4/r1", regex) == {}  # the run's own per-K tags are not drawn twice
    train = {c["title"]: c["multiline"]["tag"][0] for c in categories["train"]}
    assert set(train) == {"train/k*/loss", "train/k*/encoder_correction_ratio"}
    assert set(tb.matching("tree_k4/r1", train["train/k*/loss"])) == {"train/k1/loss", "train/k2/loss"}
    assert {c["title"] for c in categories["speed"]} == {f"speed/k*/{n}" for n in ("samples_per_s", "prompt_tokens_per_s", "merged_tokens_per_s")}
    # once per run: fit wrote it; the test and validate processes found it and wrote none
    assert len([f for f in run.glob("events.out.tfevents.*") if event_tags_of(f) & {"custom_scalars__config__"}]) == 1


def event_tags_of(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {v.tag for e in EventFileLoader(str(path)).Load() for v in e.summary.value}


def test_hparams_table_has_the_settings_and_the_final_val_and_test_numbers(board):
    root, run, metrics = board
    tb = Board(root)
    infos = {h["name"]: h for h in tb.experiment()["hparamInfos"]}
    assert {"model.ks", "model.lr_lora", "model.lora.r", "data.benchmark", "data.k_schedule", "data.seed", "seed",
            "trainer.max_epochs"} <= set(infos)
    assert not any(name.split(".")[-1].startswith("_") for name in infos)  # no LightningCLI internals
    (group,) = tb.session_groups()
    assert group["name"] == "tree_k4/r1" and group["hparams"]["model.ks"] == "[1, 2]"
    assert group["hparams"]["data.benchmark"] == "tree" and group["hparams"]["model.lora.r"] == 4
    (session,) = group["sessions"]
    assert session["status"] == "STATUS_SUCCESS"
    values = {(m["name"].get("group", ""), m["name"]["tag"]): (m["value"], m["trainingStep"]) for m in group["metricValues"]}
    step = metrics["global_step"]
    for split in ("val", "test"):
        for k in ("k1", "k2"):
            for name in ("balanced_accuracy", "accuracy", "pl_f1", "perplexity"):
                want = metrics[split][k][name]
                assert values[("", f"{split}/{k}/{name}")] == (pytest.approx(want, rel=1e-6), step)
                assert values[(f"by_k/{k}", f"{split}/{name}")] == (pytest.approx(want, rel=1e-6), step)


def test_test_and_validate_points_sit_at_the_trained_step_and_there_is_no_val_stage(board):
    root, run, metrics = board
    tb = Board(root)
    step = metrics["global_step"]
    assert step > 0
    for name in ("tree_k4/r1", "tree_k4/r1/by_k/k1", "tree_k4/r1/by_k/k2"):
        scalars = tb.scalars(name)
        tests = {tag: points for tag, points in scalars.items() if tag.startswith("test")}
        assert tests and all(points == [(step, pytest.approx(points[0][1]))] for points in tests.values()), name
        vals = [p for tag, points in scalars.items() if tag.startswith("val") for p in points]
        assert vals and min(s for s, _ in vals) > 0  # fit's validations, then validate's point at the trained step
        assert max(s for s, _ in vals) == step
        assert not [tag for tag in scalars if tag.startswith(("val_stage/", "test_stage/"))], name
    epoch = tb.scalars("tree_k4/r1")["epoch"]
    assert max(s for s, _ in epoch) < step and {v for _, v in epoch} == {0.0, 1.0}  # training's only: test/validate add none


def test_backfill_gives_an_old_run_its_k_runs_and_layout(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from ktm.io import write_json
    from ktm.training.callbacks import backfill_k_views

    old = tmp_path / "exp" / "old"
    writer = SummaryWriter(str(old))  # events as ktm wrote them before: per-K tags only, test at step 0
    for step, (a1, a2) in ((49, (0.9, 0.5)), (99, (0.95, 0.7))):
        writer.add_scalar("val/k1/balanced_accuracy", a1, step)
        writer.add_scalar("val/k2/balanced_accuracy", a2, step)
        writer.add_scalar("train/k1/loss", 1.0, step)
    writer.add_scalar("test/k2/balanced_accuracy", 0.66, 0)
    writer.close()
    write_json(old / "metrics.json", {"global_step": 100})  # with its checksum, as RunOutputs writes it
    assert backfill_k_views(old) == [1, 2]
    assert backfill_k_views(old) == []  # once: neither the K runs nor the layout are written again
    tb = Board(tmp_path)
    assert tb.scalars("exp/old/by_k/k2") == {"val/balanced_accuracy": [(49, 0.5), (99, pytest.approx(0.7))],
                                             "test/balanced_accuracy": [(100, pytest.approx(0.66))]}
    charts = {c["title"]: c["multiline"]["tag"][0] for cat in tb.layout()["category"] for c in cat["chart"]}
    assert charts["val/balanced_accuracy"] == "^val/balanced_accuracy$" and "train/k*/loss" in charts
    assert re.match(charts["test/balanced_accuracy"], "test/balanced_accuracy")
    assert len([f for f in old.glob("events.out.tfevents.*") if "custom_scalars__config__" in event_tags_of(f)]) == 1
