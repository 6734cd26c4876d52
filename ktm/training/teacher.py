"""`model.distill_teacher: <export folder>`: a trained model that teaches the merged student from outside the run.

The "base" and "k1" teachers are this run's own LM (adapters off, or on at K=1). A trained uncompressed
model, e.g. the K=1 reference of the same task (`make reference`), knows the task from the first merged step
and does not drift while the student trains. It is loaded from its export with its LoRA folded into the
base weights (one plain forward per teacher pass), frozen, and kept out of the run's checkpoints: the
config's path is how a resumed run finds it again. It reads the uncompressed prompt only, so its merge
encoders, its K and its LoRA shape do not matter; its base does (the same tokens and hidden states).
"""

from __future__ import annotations

from pathlib import Path

from ktm.errors import KTMError
from ktm.model import KTMModel


def load_teacher(directory: str | Path, student: KTMModel, dtype: str = "float32") -> KTMModel:
    """The frozen teacher of `student` from an export folder (LoRA merged in, eval mode, no gradients)."""
    directory = Path(directory)
    if not (directory / "ktm.json").is_file():
        raise KTMError(f"model.distill_teacher {str(directory)!r} is neither base, k1 nor an export folder (no ktm.json there)",
                       "use base, k1, or the export of a trained run, e.g. checkpoints/amazon_k4/k1ref_s0/export")
    teacher = KTMModel.from_pretrained(directory, dtype=dtype)  # leaves the run's seeded stream where it was
    if teacher.base_fingerprint != student.base_fingerprint:
        raise KTMError(f"model.distill_teacher {directory} was trained on another base ({teacher.base_name!r}, weights "
                       f"{str(teacher.base_fingerprint)[:12]}...), this run has {student.base_name!r}",
                       "use the export of a run on this run's model.base")
    teacher = teacher.merged_for_serving()
    teacher.requires_grad_(False)
    return teacher

