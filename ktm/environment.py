"""What a run was measured with: package versions, CPU and GPU (written to metrics.json), and the
pinned constraints.txt that `make install` installs with (`make constraints` regenerates it).

Plain python + torch, no Lightning, so the benchmark and tests can use it too.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import platform
import re
import sys
from pathlib import Path

# The packages that compute a result (model, training loop, metrics, data), recorded in every metrics.json.
PACKAGES = ("torch", "transformers", "peft", "lightning", "datasets", "torchmetrics", "numpy")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")
CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# torch is pinned by the Makefile (TORCH_SPEC: a CPU wheel here, a CUDA build elsewhere), ktm is the
# editable checkout itself, and pip freeze never lists pip's own tooling.
UNPINNED = {"ktm", "torch", "pip", "setuptools", "wheel", "distribute"}

CONSTRAINTS_HEADER = """\
# Exact versions of everything `pip install -e ".[test]"` pulls in (torch aside: the Makefile pins it
# with TORCH_SPEC). The README results were measured with these; `make install` installs with
# `-c constraints.txt`, and tests/test_environment.py fails when .venv drifts from this file.
# Update it on purpose only, never silently: upgrade in .venv (e.g. .venv/bin/pip install -U transformers),
# rerun the tests and the runs you report, then `make constraints` and commit the diff with the new results.
"""


def canonical(name: str) -> str:
    """PEP 503 name: `typing_extensions`, `Typing-Extensions` and `typing.extensions` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpuinfo_field(name: str, cpuinfo: Path = CPUINFO) -> str | None:
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:  # not Linux
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX): without either, bf16 matmuls on
    CPU are emulated and usually slower than float32."""
    return bool(cpu_flags(cpuinfo) & set(BF16_FLAGS))


def native_precision(accelerator: str = "auto", cpuinfo: Path = CPUINFO) -> str:
    """Lightning precision for `trainer.precision: null`: bf16-mixed where the device computes bfloat16
    natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX), else 32-true. Measured on an
    AVX2-only EPYC: a 2048x2048 bf16 matmul ran at under 1 GFLOP/s against 144 in float32, and a training
    step was ~30x slower. Master weights (LoRA, encoders) stay float32 either way."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    return "bf16-mixed" if accelerator in ("auto", "cpu") and cpu_has_native_bf16(cpuinfo) else "32-true"


def cpu_name() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def environment() -> dict:
    """Versions and hardware of this process, for metrics.json (`environment`)."""
    import torch

    flags = cpu_flags()
    info = {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES},
            "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            **{flag: flag in flags for flag in BF16_FLAGS}, "cuda_devices": []}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


# -- constraints.txt ------------------------------------------------------------------------------------
def read_constraints(path: str | os.PathLike = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: pinned version} of the `name==version` lines."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def required_closure(root: str = "ktm", extras: tuple[str, ...] = ("test",), prune: tuple[str, ...] = ()) -> dict[str, str]:
    """{canonical name: version} of the installed packages that installing `root[extras]` pulls in,
    not looking into the requirements of `prune` (say torch, whose CUDA builds add nvidia-* packages).

    Walked from the installed metadata rather than taken from all of `pip freeze`, so a tool someone
    installed into .venv by hand is not pinned as if ktm needed it."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [(root, set(extras))]
    seen: dict[str, set[str]] = {}
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in seen and wanted <= seen[key]:
            continue
        seen[key] = seen.get(key, set()) | wanted
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # an optional dependency for another platform
            continue
        found[key] = dist.version
        if key in prune:
            continue
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in seen[key] | {""}):
                todo.append((req.name, set(req.extras)))
    return found


def constraints_text() -> str:
    """constraints.txt for this venv: pip-freeze lines (`Name==version`, pip's spelling and order)."""
    closure = required_closure()
    dists = {canonical(d.metadata["Name"]): d for d in metadata.distributions()}
    names = sorted((dists[key].metadata["Name"] for key in closure if key not in UNPINNED), key=str.lower)
    return CONSTRAINTS_HEADER + "".join(f"{name}=={metadata.version(name)}\n" for name in names)


def main(argv: list[str]) -> None:
    from ktm.io import write_text

    if argv != ["constraints"]:
        sys.exit("usage: python -m ktm.environment constraints   (rewrites constraints.txt from this venv)")
    print(write_text(CONSTRAINTS, constraints_text(), checksum=False))


if __name__ == "__main__":
    main(sys.argv[1:])
