"""The CLI layer: one-line parse errors for every command, one rule for whether a checkpoint fits, and the layering
(ktm/cli.py dispatches; ktm/training never imports it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ktm.cli import main
from ktm.training.module import CKPT_MUST_MATCH, checkpoint_mismatch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, command", [
    (["fit", "--exp", "tree_k4", "--frobnicate=1"], "ktm fit"),
    (["generate", "--ckpt", ".", "--frobnicate", "hi"], "ktm generate"),
    (["data", "build", "--frobnicate"], "ktm data"),  # argparse reports unknown flags from the top parser
    (["bench", "--frobnicate"], "ktm bench"),
    (["data", "commits", "--repo", ".", "--frobnicate"], "ktm data commits"),
])
def test_a_bad_flag_is_one_line(argv, command, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ktm: error: unknown option --frobnicate"), err[0]
    assert err[0].endswith(f"check the spelling; `{command} --help` lists every option"), err[0]


def test_a_missing_required_flag_of_the_commit_miner_is_one_line(capsys):
    assert main(["data", "commits"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ktm: error: the following arguments are required: --repo -> fix the command line or config "
                   "(`ktm data commits --help` lists every option)"]


SETTINGS = {"base": "smollm2-135m", "ks": [1, 2, 4], "keep_tail": 0, "encoder_multiplier": None, "encoder_bound": 1.0,
            "compressor": "merge", "lora": {"r": 4, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj"]}}


@pytest.mark.parametrize("saved, mine, expected", [
    (SETTINGS, SETTINGS, None),
    (SETTINGS, {**SETTINGS, "ks": [4, 2, 1, 2]}, None),  # K values are a set
    (SETTINGS, {**SETTINGS, "ks": [1, 4]}, ("ks", [1, 2, 4], [1, 4])),
    (SETTINGS, {**SETTINGS, "base": "other"}, ("base", "smollm2-135m", "other")),
    (SETTINGS, {**SETTINGS, "lora": {**SETTINGS["lora"], "alpha": 32, "dropout": 0.0}}, None),  # same shapes
    (SETTINGS, {**SETTINGS, "lora": {**SETTINGS["lora"], "r": 8}},
     ("lora", {"r": 4, "target_modules": ["q_proj"]}, {"r": 8, "target_modules": ["q_proj"]})),
    (SETTINGS, {**SETTINGS, "max_prompt_tokens": 64, "lr_lora": 1e-3}, None),  # does not shape the weights
    (SETTINGS, {**SETTINGS, "base_fingerprint": "ab"}, None),  # hyper_parameters hold no fingerprint: not compared
    ({**SETTINGS, "base_fingerprint": "ab"}, {**SETTINGS, "base_fingerprint": "cd"}, ("base_fingerprint", "ab", "cd")),
    ({k: v for k, v in SETTINGS.items() if k != "encoder_bound"}, SETTINGS, ("encoder_bound", None, 1.0)),  # was unbounded
    ({k: v for k, v in SETTINGS.items() if k != "compressor"}, SETTINGS, None),  # was merge
    ({k: v for k, v in SETTINGS.items() if k != "compressor"}, {**SETTINGS, "compressor": "mean_pool"},
     ("compressor", "merge", "mean_pool")),
    ({k: v for k, v in SETTINGS.items() if k != "keep_tail"}, {**SETTINGS, "keep_tail": 3}, None),  # not recorded
    (SETTINGS, {**SETTINGS, "encoder_shape": "paper"}, None),  # checkpoints from before the key had the paper's
    (SETTINGS, {**SETTINGS, "encoder_shape": "shallow"}, ("encoder_shape", "paper", "shallow")),
])
def test_checkpoint_mismatch(saved, mine, expected):
    assert checkpoint_mismatch(saved, mine) == expected


def test_checkpoint_mismatch_reads_the_parsed_config_as_the_cli_passes_it():
    """The CLI compares with cfg.model, a jsonargparse Namespace whose dict unpacking flattens model.lora."""
    from jsonargparse import Namespace

    mine = Namespace(**{**SETTINGS, "lora": Namespace(**SETTINGS["lora"])})
    assert checkpoint_mismatch(SETTINGS, mine) is None
    mine.lora.r = 8
    assert checkpoint_mismatch(SETTINGS, mine)[0] == "lora"


def test_a_checkpoint_with_the_old_explicit_lora_list_fits_the_new_default_spelling():
    from ktm.model import DEFAULT_LORA_TARGETS, LLAMA_LORA_TARGETS

    old = {**SETTINGS, "lora": {**SETTINGS["lora"], "target_modules": list(LLAMA_LORA_TARGETS)}}
    new = {**SETTINGS, "lora": {**SETTINGS["lora"], "target_modules": list(DEFAULT_LORA_TARGETS)}}
    assert checkpoint_mismatch(old, new) is None  # SmolLM2 is Llama-shaped: the same layers
    key, _, _ = checkpoint_mismatch(SETTINGS, new)  # [q_proj] alone is another adapter
    assert key == "lora"


def test_checkpoint_keys_are_settings_of_the_module_or_its_metadata():
    import inspect

    from ktm.training.module import KTMModule

    module_args = set(inspect.signature(KTMModule.__init__).parameters)
    assert set(CKPT_MUST_MATCH) - module_args == {"base_fingerprint", "hidden_size"}  # metadata only


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_layers_import_downwards_only():
    for path in sorted((REPO / "ktm" / "training").glob("*.py")):
        assert not {n for n in _imports(path) if n == "ktm.cli" or n.startswith("ktm.cli.")}, path
    cli = _imports(REPO / "ktm" / "cli.py")
    assert not {n for n in cli if n.startswith("lightning")}, "ktm/cli.py dispatches; Lightning belongs to ktm/training"


@pytest.mark.parametrize("exp", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml")
                                       if p.stem != "defaults"))
def test_every_experiment_config_parses(exp, capsys):
    """Each shipped YAML (with the shared defaults) holds only known keys of the right types: `--print_config`
    parses it all without building anything, and prints the K settings it holds; its trainer settings and every
    setting `ktm fit` checks right after parsing (data, model, checkpoint monitor: one inherited through `extends`
    must name a K the experiment has) pass those checks (untested GPU recipes included), and its benchmark takes its
    options (a child's benchmark_args merges into its parent's: a key it misspells would reach the benchmark)."""
    import yaml
    from jsonargparse import Namespace

    from ktm.training.lightning_cli import check_parsed_settings, check_validation_cadence

    def namespace(value):  # the parsed config as the CLI holds it (per-K dicts keep their int keys)
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return Namespace(**{key: namespace(v) for key, v in value.items()})
        return value

    assert main(["fit", "--exp", exp, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "ks:" in out and "k_schedule:" in out and "benchmark:" in out
    cfg = yaml.safe_load(out)
    check_validation_cadence(cfg["trainer"])
    check_parsed_settings(namespace(cfg))  # also builds the benchmark from its composed options (reads no data)


# -- experiments that extend another ------------------------------------------------------------------


def _experiments(tmp_path, monkeypatch, **files: str) -> Path:
    import ktm.cli

    for name, text in {"defaults": "", **files}.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(ktm.cli, "EXPERIMENTS", tmp_path)
    return tmp_path


def test_extends_composes_the_chain_root_first(tmp_path, monkeypatch):
    from ktm.cli import expand_exp

    d = _experiments(tmp_path, monkeypatch, base="model: {}\n", mid="extends: base\n", top="extends: mid\ndata: {}\n")
    assert expand_exp(["fit", "--exp", "top", "--run", "r"]) == [
        "fit", "--config", str(d / "defaults.yaml"), "--config", str(d / "base.yaml"), "--config", str(d / "mid.yaml"),
        "--config", str(d / "top.yaml"), "--experiment", "top", "--run", "r"]
    assert expand_exp(["fit", "--exp=base"]) == ["fit", "--config", str(d / "defaults.yaml"), "--config", str(d / "base.yaml"),
                                                 "--experiment", "base"]


@pytest.mark.parametrize("base, over, merged", [
    ({"a": 1, "b": 2}, {"b": 3}, {"a": 1, "b": 3}),
    ({"a": {"x": 1, "y": 2}}, {"a": {"y": 3, "z": 4}}, {"a": {"x": 1, "y": 3, "z": 4}}),  # nested mappings merge
    ({"a": {"x": {"p": 1, "q": 2}}}, {"a": {"x": {"q": 5}}}, {"a": {"x": {"p": 1, "q": 5}}}),  # at any depth
    ({"a": {"x": 1}}, {"a": None}, {"a": None}),  # null drops the mapping
    ({"a": {"x": 1}}, {"a": {}}, {"a": {"x": 1}}),  # an empty mapping changes nothing
    ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),  # a list is replaced whole
    ({"a": 1.0e-3}, {"a": {1: 1.0e-3, 4: 3.0e-4}}, {"a": {1: 1.0e-3, 4: 3.0e-4}}),  # a number becomes a per-K mapping
    ({"a": {1: 1.0}}, {"a": {4: 2.0}}, {"a": {1: 1.0, 4: 2.0}}),
])
def test_deep_merge(base, over, merged):
    from ktm.cli import deep_merge

    assert deep_merge(base, over) == merged


def test_a_child_changes_one_key_of_a_mapping_option(tmp_path, monkeypatch):
    """Repeated --config files would replace data.benchmark_args whole: the deep-merged mapping follows them, only
    where a child changes part of one (and null drops it)."""
    from ktm.cli import expand_exp

    d = _experiments(tmp_path, monkeypatch, base="data:\n  benchmark_args: {a: 1, b: {x: 1, y: 2}}\n  batch_size: 4\n",
                     top="extends: base\ndata:\n  benchmark_args: {b: {y: 3}}\n", whole="extends: base\ndata:\n  benchmark_args: {a: 2, b: {x: 0, y: 0}}\n",
                     none="extends: base\ndata:\n  benchmark_args: null\n", again="extends: none\ndata:\n  benchmark_args: {c: 1}\n")

    def configs(*names):
        return [a for n in ("defaults", *names) for a in ("--config", str(d / f"{n}.yaml"))]

    assert expand_exp(["fit", "--exp", "top"]) == ["fit", *configs("base", "top"), "--data.benchmark_args={a: 1, b: {x: 1, y: 3}}",
                                                   "--experiment", "top"]
    for name, chain in (("whole", ("base", "whole")), ("none", ("base", "none")), ("again", ("base", "none", "again"))):
        assert expand_exp(["fit", "--exp", name]) == ["fit", *configs(*chain), "--experiment", name]  # the last file's value


def test_a_child_option_on_the_command_line_still_wins(capsys):
    """read_rt_k4 names one key of read_amazon_k4's benchmark_args; the rest is inherited, and a command-line key
    after --exp still overrides the merged mapping."""
    import yaml

    assert main(["fit", "--exp", "read_rt_k4", "--data.benchmark_args.prefix_words=12", "--print_config"]) == 0
    args = yaml.safe_load(capsys.readouterr().out)["data"]["benchmark_args"]
    assert args == {"sources": ["benchmark:rotten_tomatoes"], "prefix_words": 12, "continuation_words": 3,
                    "reconstruction_share": 0.5, "windows_per_document": 1, "max_documents": 20000,
                    "whitespace": "collapse", "benchmark_split": "example"}


@pytest.mark.parametrize("files, expected", [
    ({"top": "extends: gone\n"}, "experiments/top.yaml extends 'gone', which does not exist -> use one of: top"),
    ({"a": "extends: b\n", "b": "extends: a\n"}, "experiments extend each other in a circle: a -> b -> a -> remove"),
    ({"a": "extends: a\n"}, "experiments extend each other in a circle: a -> a -> remove"),
    ({"a": "extends: [b]\n", "b": ""}, "must be one experiment name, got ['b'] -> write e.g. extends: read_amazon_k4"),
    ({"a": "extends: b\n", "b": "model: [\n"}, "cannot read"),
])
def test_a_bad_extends_is_one_line(files, expected, tmp_path, monkeypatch, capsys):
    _experiments(tmp_path, monkeypatch, **files)
    assert main(["fit", "--exp", next(iter(files)), "--print_config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_ktm_experiments_lists_each_with_what_it_extends(tmp_path, monkeypatch, capsys):
    _experiments(tmp_path, monkeypatch, base="model: {}\n", long_name="extends: base\n")
    assert main(["experiments"]) == 0
    assert capsys.readouterr().out.splitlines() == ["base", "long_name  extends base"]


def test_an_extending_experiment_resolves_to_its_parent_with_its_changes(capsys):
    """read_rt_k4 is read_amazon_k4 on another source: the resolved configs differ in that source (and the
    recorded names) only, so the file holds just the difference."""
    import yaml

    def resolved(exp):
        assert main(["fit", "--exp", exp, "--print_config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)

    child, parent = resolved("read_rt_k4"), resolved("read_amazon_k4")
    assert child.pop("extends") == "read_amazon_k4" and parent.pop("extends") is None
    assert child.pop("experiment") == "read_rt_k4" and parent.pop("experiment") == "read_amazon_k4"
    assert child["data"]["benchmark_args"].pop("sources") == ["benchmark:rotten_tomatoes"]
    assert parent["data"]["benchmark_args"].pop("sources") == ["benchmark:amazon"]
    assert child == parent
