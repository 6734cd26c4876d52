"""The pinned environment (constraints.txt matches .venv) and the versions/hardware written to metrics.json."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import platform

import pytest
import torch

from ktm.environment import (BF16_FLAGS, CONSTRAINTS, PACKAGES, UNPINNED, canonical, constraints_text, cpu_has_native_bf16,
                             environment, read_constraints, required_closure)


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_venv_matches_constraints():
    """Fails when .venv drifts from constraints.txt: reinstall (make install) or, on purpose, make constraints."""
    pins = read_constraints(CONSTRAINTS)
    assert len(pins) > 20  # the file was read, not an empty or misparsed one
    drift = {name: (pin, _installed(name)) for name, pin in pins.items() if _installed(name) not in (None, pin)}
    assert not drift, f"installed versions differ from constraints.txt (pin, installed): {drift}"


def test_every_dependency_is_pinned():
    """A dependency added to pyproject.toml (or pulled in by a new version) must reach constraints.txt."""
    pins = read_constraints(CONSTRAINTS)
    # torch's own requirements depend on its build (TORCH_SPEC): a CUDA torch adds nvidia-* packages
    missing = sorted(set(required_closure(prune=("torch",))) - set(pins) - UNPINNED)
    assert not missing, f"not in constraints.txt (run make constraints on purpose): {missing}"
    assert "torch" not in pins and "ktm" not in pins  # the Makefile pins torch (TORCH_SPEC)


def test_make_constraints_writes_the_header_and_the_installed_versions(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text(constraints_text())
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("make constraints" in line for line in header) and any("never silently" in line for line in header)
    pins = read_constraints(path)
    assert not {"torch", "ktm", "pip", "setuptools"} & set(pins)
    assert pins == {name: _installed(name) for name in pins}
    assert set(pins) >= {"transformers", "peft", "lightning", "pytest", "hypothesis"}  # the [test] extra too


def test_read_constraints_normalises_names(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("# header\nTyping_Extensions==4.1.0\nPyYAML==6.0  # why\n\n")
    assert read_constraints(path) == {"typing-extensions": "4.1.0", "pyyaml": "6.0"}
    assert canonical("docstring_parser") == canonical("Docstring.Parser") == "docstring-parser"


def test_environment_keys_and_versions():
    env = environment()
    assert set(env) >= {"python", *PACKAGES, "cpu", "cpu_count", "torch_threads", *BF16_FLAGS, "cuda_devices"}
    for name in PACKAGES:
        assert env[name] == metadata.version(name), name
    assert env["python"] == platform.python_version() and env["torch"] == torch.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert all(isinstance(env[flag], bool) for flag in BF16_FLAGS)
    assert cpu_has_native_bf16() == (env["avx512_bf16"] or env["amx_bf16"])
    expected_gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert env["cuda_devices"] == expected_gpus
    json.dumps(env)  # goes into metrics.json as is


@pytest.mark.parametrize("flags, native", [("fpu sse avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                           ("fpu amx_tile amx_bf16 amx_int8", True)])
def test_cpu_has_native_bf16_reads_the_flags(flags, native, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("flags, precision", [("fpu avx2 fma", "32-true"), ("fpu avx512f avx512_bf16", "bf16-mixed")])
def test_null_precision_is_bf16_only_where_the_cpu_has_it(flags, precision, tmp_path, monkeypatch):
    import torch

    from ktm.environment import native_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this is the CPU path whatever the machine
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert native_precision("auto", cpuinfo) == precision
    assert native_precision("cpu", cpuinfo) == precision
    assert native_precision("gpu", cpuinfo) == "32-true"  # asked for a GPU that is not there: never bf16 on CPU


def test_null_precision_in_a_fit_resolves_to_what_the_machine_runs(tmp_path):
    import yaml

    from ktm.cli import main
    from ktm.environment import native_precision

    tiny = ["--model.base=config:tiny-llama", "--data.benchmark_args={n_trees: 60}", "--data.max_train_examples=8",
            "--data.max_val_examples=8", "--data.max_test_examples=8", "--data.batch_size=8", "--trainer.enable_progress_bar=false"]
    assert main(["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--run", "p", "--trainer.max_steps=1", *tiny]) == 0
    saved = yaml.safe_load((tmp_path / "tree_k4" / "p" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == native_precision("auto")


def test_cpu_has_native_bf16_without_cpuinfo(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def test_fit_writes_the_environment_to_metrics(tmp_path):
    from ktm.cli import main

    tiny = ["--model.base=config:tiny-llama", "--data.benchmark_args={n_trees: 60}", "--data.max_train_examples=8",
            "--data.max_val_examples=8", "--data.max_test_examples=8", "--data.batch_size=8", "--trainer.enable_progress_bar=false"]
    assert main(["fit", "--exp", "tree_k4", "--root", str(tmp_path), "--run", "env", "--trainer.max_epochs=1", *tiny,
                 "--model.ks=[2]", "--data.k_schedule=[2]", "--model.lr_encoder=0.0001"]) == 0
    metrics = json.loads((tmp_path / "tree_k4" / "env" / "metrics.json").read_text())
    written = metrics["environment"]["fit"]
    assert written["torch"] == metadata.version("torch") and written["transformers"] == metadata.version("transformers")
    assert written["torch_threads"] == torch.get_num_threads() and written["python"] == platform.python_version()
