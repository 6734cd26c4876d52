"""`ktm eval`: does merging still hold on *your* texts? Perplexity drift per K, as a CI guard.

    ktm eval --ckpt checkpoints/<exp>/<run>/export --data PATH [--field text] [--ks 2 4] [--max-drift 0.08]
             [--prefix-tokens 128] [--continuation-tokens 32] [--max-texts N] [--batch-size 8] [--json OUT]
             [--versus OTHER.json]
             [--policies fixed budget] [--segment-tokens 16] [--policy-score surprisal|random] [--keep-tail N]

PATH is a .txt/.md/.rst/.py file (one text), a JSON Lines file (one text per row, in --field), or a folder
of them (read recursively, in name order), the files the reading benchmark's `path:` source reads. Each
text's first prefix tokens are merged at K and its next continuation tokens scored, against the same
checkpoint at K=1 reading the plain prefix: drift = ppl_merged / ppl_uncompressed - 1
(`KTMModel.drift`, which does the computation; this module reads files and formats). Prints a markdown
table; exit code 1 when any K's drift is above --max-drift, 0 otherwise, 2 for bad input. --policies adds a
row per merge policy (ktm.policy: `budget` spreads K over the prefix by content at K on average).
--versus compares two checkpoints on the same windows (another run's --json): their perplexity ratio per
K with a paired bootstrap interval over texts, so "better" comes with the noise of the text sample.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ktm.benchmarks.reading import TEXT_SUFFIXES
from ktm.errors import KTMError, OneLineParser, check_count
from ktm.io import read_json, read_jsonl, write_json
from ktm.metrics import paired_ppl_ratio
from ktm.policy import MERGED_POSITIONS, POLICIES, SCORES, TokenScores


def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """The texts under `path`, as the reading benchmark's path: source picks files, but strict: a file
    that is not UTF-8 is an error naming it (the benchmark replaces bad bytes, which would score noise)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise KTMError(f"--data {root} does not exist", "pass a .txt or .jsonl file, or a folder of them")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
    if not files:
        raise KTMError(f"--data folder {root} holds no {'/'.join((*TEXT_SUFFIXES, '.jsonl'))} file", "point --data at a folder of texts")
    texts: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            for i, row in enumerate(read_jsonl(f, (), "--data file"), 1):
                if not isinstance(row.get(field), str):
                    what = f"has no field {field!r}" if field not in row else f"has a {type(row[field]).__name__} in {field!r}, not text"
                    raise KTMError(f"--data file {f} row {i} {what} (its fields: {', '.join(row) or 'none'})",
                                   "pass --field with the name of the field that holds the text")
                texts.append(row[field])
            continue
        try:
            texts.append(f.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise KTMError(f"--data file {f} is not UTF-8 text (byte {exc.start})",
                           "convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out of --data") from None
    if not any(t.strip() for t in texts):
        raise KTMError(f"--data {root} holds no text (every file or row is empty)", "fill it with the texts to check")
    return texts


READING = "reading:"


def reading_texts(spec: str, prefix_tokens: int, continuation_tokens: int) -> list[str]:
    """`--data reading:SOURCE[,SOURCE...]`: the held-out documents of the reading stage on those sources (its
    test split: documents no reading run trained on), cut into windows of prefix_tokens + continuation_tokens
    words. A word is at least one token, so every window is long enough to be scored."""
    from ktm.benchmarks import get_benchmark

    sources = [s for s in spec[len(READING):].split(",") if s]
    if not sources:
        raise KTMError(f"--data {spec} names no reading source", "e.g. --data reading:sotu,django_docs (or reading:path:<folder>)")
    bench = get_benchmark("reading", sources=sources, prefix_words=prefix_tokens, continuation_words=continuation_tokens)
    texts = [e.prompt + e.target for e in bench.load("all").test]
    if not texts:
        raise KTMError(f"--data {spec}: the reading stage holds out no document of these sources (too few documents)",
                       "add documents or sources, or pass a file of your own texts")
    return texts


def drift_table(result: dict, max_drift: float) -> str:
    """Markdown: one row per K, status ABOVE where drift exceeds max_drift, and what was scored."""
    lines = ["| K | policy | prefix positions | texts | tokens | ppl uncompressed | ppl merged | drift | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["per_k"]:
        status = "ABOVE" if r["drift"] > max_drift else "OK"
        lines.append(f"| {r['k']} | {r.get('policy', 'fixed')} | {r['prefix_positions']:.1f} | {r['texts']} | {r['tokens']} "
                     f"| {r['ppl_uncompressed']:.3f} | {r['ppl_merged']:.3f} | {r['drift']:+.2%} | {status} |")
    p, c = result["prefix_tokens"], result["continuation_tokens"]
    where = result.get("merged_positions", "compact")
    lines += ["", f"{result['texts']} texts scored: each one's first {p} tokens are the prompt (merged at K, {where} positions; uncompressed: the "
                  f"same checkpoint at K=1), its next {c} tokens are scored; {result['skipped']} skipped (shorter than {p + c} "
                  f"tokens). drift = ppl merged / ppl uncompressed - 1; ABOVE when over {max_drift:.2%}."]
    return "\n".join(lines)


def data_key(data: str) -> str:
    """What names the texts of --data: a reading: spec as written, a path as its absolute form (the same
    file named relatively and absolutely is the same data)."""
    return data if data.startswith(READING) else str(Path(data).expanduser().resolve())


def read_versus(path: str, data: str, field: str, prefix_tokens: int, continuation_tokens: int) -> dict:
    """Another `ktm eval --json` result to compare with: it must have scored the same windows."""
    other = read_json(path, "--versus file")
    if not isinstance(other, dict) or not isinstance(other.get("nll_per_text"), dict):
        raise KTMError(f"--versus file {path} is not a `ktm eval --json` result (no nll_per_text)",
                       "pass a file that `ktm eval ... --json FILE` wrote")
    mine = {"data": data_key(data), "field": field, "prefix_tokens": prefix_tokens, "continuation_tokens": continuation_tokens}
    theirs = {**other, "data": other.get("data_key") or data_key(str(other.get("data", "")))}  # files before data_key: resolved here
    for key, value in mine.items():
        if theirs.get(key) != value:
            raise KTMError(f"--versus file {path} scored other windows ({key} {theirs.get(key)!r}, here {value!r})",
                           "compare evaluations of the same --data, --field, --prefix-tokens and --continuation-tokens")
    return other


def versus_rows(result: dict, other: dict) -> list[dict]:
    """This checkpoint against the other, side by side: every side both scored (uncompressed, "<K>",
    "<K>:budget"), ppl here / ppl there with a paired bootstrap interval over the texts."""
    mine, theirs = result["nll_per_text"], other["nll_per_text"]
    shared = [name for name in mine if name in theirs]
    if not shared:
        raise KTMError(f"--versus {other.get('ckpt')} scored none of the sides here ({', '.join(mine)}; it has {', '.join(theirs)})",
                       "pass --ks (and --policies) that the other evaluation also ran")
    if any(len(theirs[name]) != len(mine[name]) for name in shared):
        raise KTMError(f"--versus {other.get('ckpt')} scored {len(theirs[shared[0]])} texts, here {len(mine[shared[0]])}",
                       "compare evaluations of the same texts (same --data and --max-texts)")
    return [{"side": name, "ppl": math.exp(math.fsum(mine[name]) / result["tokens"]),
             "ppl_versus": math.exp(math.fsum(theirs[name]) / result["tokens"]),
             **paired_ppl_ratio(mine[name], theirs[name], result["continuation_tokens"])} for name in shared]


def versus_table(rows: list[dict], other_ckpt: str) -> str:
    lines = [f"Against {other_ckpt} on the same windows (ratio = ppl here / ppl there; 95% paired bootstrap over texts):", "",
             "| side | ppl here | ppl there | ratio [95%] | texts better here |", "|---|---|---|---|---|"]
    for r in rows:
        side = "uncompressed (K=1)" if r["side"] == "uncompressed" else f"K={r['side']}"
        lines.append(f"| {side} | {r['ppl']:.3f} | {r['ppl_versus']:.3f} | {r['ratio']:.3f} [{r['low']:.3f}–{r['high']:.3f}] "
                     f"| {r['a_better']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="ktm eval", description="Perplexity drift of merged prompts against uncompressed ones, on your texts.")
    p.add_argument("--ckpt", required=True, help="export folder of a run (checkpoints/<exp>/<run>/export)")
    p.add_argument("--data", required=True, help="a .txt file, a JSON Lines file, or a folder of them; or reading:SOURCE[,SOURCE...], "
                                                 "the reading stage's held-out documents (e.g. reading:sotu,django_docs)")
    p.add_argument("--field", default="text", help="JSON Lines field that holds the text")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="K values to check (default: every K > 1 of the checkpoint)")
    p.add_argument("--max-drift", type=float, default=0.08, help="exit 1 when a K's drift (ppl_merged/ppl_uncompressed - 1) is above this")
    p.add_argument("--prefix-tokens", type=int, default=128, help="tokens of each text merged as the prompt")
    p.add_argument("--continuation-tokens", type=int, default=32, help="tokens after the prefix that are scored")
    p.add_argument("--max-texts", type=int, default=None, help="score at most this many texts (the first long enough)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None, help="also write the result here as JSON")
    p.add_argument("--versus", default=None, help="another `ktm eval --json` result on the same windows: adds this "
                                                  "checkpoint's perplexity ratio to it per K, with a paired bootstrap interval")
    p.add_argument("--base", default=None, help="override the base model location (same weights required)")
    p.add_argument("--policies", nargs="+", default=None, choices=POLICIES,
                   help="merge policies to check, one row per K each (default: the checkpoint's; ktm.policy)")
    p.add_argument("--segment-tokens", type=int, default=None, help="window of the budget policy (default: the checkpoint's)")
    p.add_argument("--policy-score", default=None, choices=SCORES, help="what ranks the budget policy's windows (default: the checkpoint's)")
    p.add_argument("--keep-tail", type=int, default=None,
                   help="leave the last N prefix tokens unmerged (default: the checkpoint's keep_tail), e.g. to compare "
                        "a budget policy with keeping the end of the prompt in tokens at the same length")
    p.add_argument("--merged-positions", default=None, choices=MERGED_POSITIONS,
                   help="where the base sees each merged embedding (default: the checkpoint's; README, the method in the code)")
    a = p.parse_args(argv)
    if not math.isfinite(a.max_drift):
        raise KTMError(f"--max-drift must be a finite number, got {a.max_drift}", "pass e.g. --max-drift 0.08 (8%)")
    check_count("--keep-tail", a.keep_tail, 0, "pass e.g. --keep-tail 16 (0: merge the whole prefix)", allow_none=True)
    from ktm.model import KTMModel, check_drift_counts

    # bad input fails here, before the model loads (the reading windows are cut by these counts)
    check_drift_counts(prefix_tokens=a.prefix_tokens, continuation_tokens=a.continuation_tokens)
    other = read_versus(a.versus, a.data, a.field, a.prefix_tokens, a.continuation_tokens) if a.versus else None
    texts = (reading_texts(a.data, a.prefix_tokens, a.continuation_tokens) if a.data.startswith(READING)
             else read_texts(a.data, a.field))
    from tqdm import tqdm

    model = KTMModel.from_pretrained(a.ckpt, base=a.base)
    if a.keep_tail is not None:
        model.keep_tail = a.keep_tail
    if a.segment_tokens is not None:
        model.segment_tokens = a.segment_tokens  # checked with the policies, in drift()
    if a.policy_score is not None:
        model.token_scores = TokenScores(a.policy_score)
    if a.merged_positions is not None:
        model.merged_positions = a.merged_positions
    with tqdm(desc="ktm eval", unit="text", file=sys.stderr, mininterval=1.0) as bar:
        def step(n: int, total: int) -> None:
            bar.total = total
            bar.update(n)

        result = model.drift(texts, ks=a.ks, prefix_tokens=a.prefix_tokens, continuation_tokens=a.continuation_tokens,
                             batch_size=a.batch_size, max_texts=a.max_texts, progress=step, policies=a.policies)
    above = [r for r in result["per_k"] if r["drift"] > a.max_drift]
    print(drift_table(result, a.max_drift))
    versus = {"ckpt": other.get("ckpt"), "file": str(a.versus), "rows": versus_rows(result, other)} if other else None
    if versus:
        print("\n" + versus_table(versus["rows"], versus["ckpt"]))
    if a.json:
        for r in result["per_k"]:
            r["status"] = "ABOVE" if r["drift"] > a.max_drift else "OK"
        write_json(a.json, {**result, "ckpt": str(a.ckpt), "data": str(a.data), "data_key": data_key(a.data), "field": a.field, "max_drift": a.max_drift,
                            "status": "ABOVE" if above else "OK", **({"versus": versus} if versus else {})})
    return 1 if above else 0
