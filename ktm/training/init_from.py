"""`model.init_from`: start a run from the LoRA and merge encoders of an exported run (e.g. a reading stage).

Only weights that fit are loaded, and only all of them: the export must come from the same base weights,
the same LoRA shape (rank, target modules) and have an encoder of the same shape for every K > 1 of this
run. Anything else is one clear line before a single weight is touched.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ktm.errors import KTMError
from ktm.io import read_json, verify
from ktm.model import KTMModel, with_unrecorded

log = logging.getLogger("ktm")


def _check(meta: dict, model: KTMModel, directory: Path) -> list[int]:
    fix = "start from an export of a run with the same model.base, model.lora and merge encoders, or drop model.init_from"
    if meta.get("base_fingerprint") != model.base_fingerprint:
        raise KTMError(f"model.init_from {directory} was trained on another base ({meta.get('base')!r}, weights "
                       f"{str(meta.get('base_fingerprint'))[:12]}...), this run has {model.base_name!r}", fix)
    ours = model.metadata()
    theirs = meta.get("lora") or {}
    mine = ours["lora"] or {}
    for key in ("r", "target_modules"):
        if theirs.get(key) != mine.get(key):
            raise KTMError(f"model.init_from {directory} has LoRA {key}={theirs.get(key)}, this run has {mine.get(key)}", fix)
    for key in ("hidden_size", "encoder_multiplier", "encoder_bound", "encoder_shape"):
        if meta.get(key) != ours[key]:
            raise KTMError(f"model.init_from {directory} has {key}={meta.get(key)}, this run has {ours[key]}", fix)
    missing = [k for k in model.ks if k > 1 and k not in meta.get("ks", [])]
    if missing:
        raise KTMError(f"model.init_from {directory} has no merge encoder for K={missing} (it has K={meta.get('ks')})",
                       "start from an export trained with those K, or remove them from model.ks")
    if meta["merged_positions"] != model.merged_positions:  # the weights fit; what they learnt to read moves
        log.info("model.init_from %s read merged blocks at %s positions; this run reads them at %s (model.merged_positions)",
                 directory, meta["merged_positions"], model.merged_positions)
    return [k for k in model.ks if k > 1]


def load_trained_weights(model: KTMModel, directory: str | Path) -> list[int]:
    """Copy the export's LoRA and the encoders of this run's K into `model`; return those K."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = with_unrecorded(read_json(directory / "ktm.json", "model.init_from metadata"))
    ks = _check(meta, model, directory)
    encoders = load_file(str(verify(directory / "encoder.safetensors", "merge encoder weights"))) if ks else {}
    lora = {}
    if model.lora_settings is not None:
        lora = load_file(str(verify(directory / "adapter" / "adapter_model.safetensors", "LoRA adapter file")))
    with torch.no_grad():
        for k in ks:
            prefix = f"{k}."
            state = {name[len(prefix):]: t for name, t in encoders.items() if name.startswith(prefix)}
            model.encoders[str(k)].load_state_dict(state)  # same shapes: checked above
        if lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model.lm, lora)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise KTMError(f"model.init_from {directory}: adapter weights do not fit this model ({unexpected[0]})",
                               "start from an export of a run with the same model.base and model.lora")
    return ks
