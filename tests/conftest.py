"""Shared fixtures: tiny config-built models (fast unit tests) and isolated data/cache folders."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from ktm.model import KTMModel, LoraSettings


@pytest.fixture(autouse=True)
def _isolated_data(tmp_path, monkeypatch):
    """No test writes into the repo's data/ (generated caches)."""
    import ktm.benchmarks.common as common

    monkeypatch.setattr(common, "DATA_DIR", tmp_path / "data")


@pytest.fixture
def tiny():
    """A 2-layer random Llama with the byte tokenizer, K in {1, 2, 4, 8}, LoRA on."""
    torch.manual_seed(0)
    model = KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4, 8], lora=LoraSettings(r=4))
    # Non-zero last layers so the encoders are not just the mean (invariance tests must see the MLP).
    for enc in model.encoders.values():
        if enc.mlp is not None:
            torch.nn.init.normal_(enc.mlp[-1].weight, std=0.02)
    return model.eval()


@pytest.fixture(autouse=True)
def _lightning_logs_to_current_stderr():
    """Lightning's log handlers keep the stderr of the first test; point them at the current one so
    capsys/capfd see Lightning's lines in every test."""
    import lightning.pytorch  # noqa: F401  (creates the loggers)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setStream(sys.stderr)
