"""`ktm bench`: does merging K tokens buy the prefill speed-up it promises, end to end?

For each model, batch size B, prompt length N and K it measures, with KTMModel's own code
(build_batch, prefill, decode_step, pick: the calls generate_ids makes):

  * TTFT end to end = tokenise + embedding lookup + merge encoder + layout (padding/concat) + prefill
    (LoRA on, KV cache on, last position's logits only) + first token (greedy pick), and that split into
    its parts. The embedding and encoder parts are timed by forward hooks inside `build_batch`, so the
    split comes from the very run whose total is reported.
  * the ceiling: the bare base (LoRA off) prefilling a random embedding sequence of the merged length.
    Speed-up vs K=1 for both; "fraction of ceiling" = e2e speed-up / ceiling speed-up.
  * TTFT of the served model: the LoRA merged into a copy of the base (KTMModel.merged_for_serving),
    next to the unmerged TTFT and the ceiling.
  * the machine's own matmul peak (a large GEMM, float32 and bfloat16) and each prefill's achieved
    FLOP/s (analytic count, `prefill_flops`) as a fraction of it.
  * encoder share = encoder time / compressed prefill time, with an analytic FLOP ratio beside it.
  * peak memory of one e2e run and the KV-cache bytes of the tensors the prefill returned.
  * decode tokens/s on the cache of the merged prefill vs that of the normal (K=1) prefill.
  * one training step (tokenise + build_batch + target NLL forward + backward + AdamW) per K.

Timings run in interleaved rounds: one round times every K's e2e, ceiling and merged TTFT back to back,
and `--warmup` untimed rounds come first. A speed-up divides two times from the same round, so it is
computed per round and reported as the median of the `--repeats` per-round ratios with their min-max
(a moment of machine noise moves one round's ratio instead of one K's every point). Times themselves are
reported as median with min/max and quartiles.
Targets are printed as PASS/MISS; the command never fails on timing. Speed does not depend on the
weight values, so the config-built shapes (random weights) stand in for the real models.
`--compile` times the prefills with the LM under torch.compile, as a server would run it; `--profile` adds
the operator table of one bare-base prefill per (batch, length), which says where the time below the matmul
peak goes (on 2 EPYC cores in bf16: the CPU attention kernel, README Speed). `--attention auto` runs the LM with
ktm's `blocked_causal` kernel on CPU (1.16-1.27x faster bf16 prefills than SDPA there) and SDPA on CUDA.
Outputs: checkpoints/bench/<name>/{results.json, results.md, speedup.png[, prefill_profile.txt]}.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import platform
import random
import string
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ktm.attention import CHOICES, resolve
from ktm.encoder import SHAPES
from ktm.errors import KTMError, OneLineParser
from ktm.memory import release_freed_heap, rss_bytes, status_kib

log = logging.getLogger("ktm")

# Bench names -> KTMModel.from_base names. Config shapes have random weights (speed only);
# smollm2-135m is the embedded real base. Any other "config:<shape>" is accepted as well.
MODELS = {
    "smollm2-135m": "smollm2-135m",
    "qwen2.5-0.5b": "config:qwen2.5-0.5b",
    "qwen2.5-1.5b": "config:qwen2.5-1.5b",
    "qwen2.5-7b": "config:qwen2.5-7b",
    "tiny-llama": "config:tiny-llama",
}
TARGET_FRACTION, TARGET_FRACTION_K = 0.9, 4
TARGET_ENCODER_SHARE, TARGET_ENCODER_LENGTH = 0.05, 2048
PARTS = ("tokenize", "embed", "encoder", "layout", "prefill", "first_token")

# Defaults per device: the CPU grid must finish in ~15 min on 2 cores; the full grid is for GPUs.
# peak_size: side of the square GEMM of the matmul peak; a GPU needs a bigger one to be kept busy.
DEFAULTS = {
    "cpu": dict(lengths=[512, 2048], batch_sizes=[1], repeats=3, warmup=1, decode_tokens=16, train_batch=1, peak_size=2048),
    "cuda": dict(lengths=[512, 2048, 8192], batch_sizes=[1, 8], repeats=10, warmup=2, decode_tokens=64, train_batch=8,
                 peak_size=8192),
}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except where the help already says them (the device-dependent ones)."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="ktm bench",
        description="Measure TTFT (split into parts), the base-only prefill ceiling, encoder share, memory, KV cache, "
        "decode and training throughput for each K. Defaults depend on the device: on CPU a grid that finishes in "
        "about 15 min on 2 cores (qwen2.5-0.5b shape, lengths 512 2048, batch 1); on CUDA the full grid "
        "(lengths 512 2048 8192, batch 1 8, bf16). Timings never make the command fail: targets print PASS/MISS.",
        formatter_class=_Help,
    )
    p.add_argument("--models", nargs="+", default=["qwen2.5-0.5b"], metavar="MODEL",
                   help=f"models to measure: {', '.join(MODELS)} or any config:<shape>; config shapes have random "
                   "weights (speed does not depend on them), smollm2-135m is the embedded real base")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8], metavar="K",
                   help="merge factors; K=1 (no merging) is always added, it is the baseline of every speed-up")
    p.add_argument("--lengths", nargs="+", type=int, default=None, metavar="N",
                   help="prompt lengths in tokens (default: 512 2048 on CPU, 512 2048 8192 on CUDA)")
    p.add_argument("--batch-sizes", "--batch", dest="batch_sizes", nargs="+", type=int, default=None, metavar="B",
                   help="batch sizes, on CPU as on CUDA: B different prompts of N tokens each (default: 1 on CPU, "
                   "1 8 on CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before the timed ones (default: 1 CPU, 2 CUDA)")
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="tokens decoded after the prefill for decode tok/s; 0 skips decode (default: 16 CPU, 64 CUDA)")
    p.add_argument("--train-length", type=int, default=512,
                   help="prompt length of the training-step measurement; 0 skips training")
    p.add_argument("--train-batch", type=int, default=None, help="batch size of the training step (default: 1 CPU, 8 CUDA)")
    p.add_argument("--train-target-tokens", type=int, default=16, help="answer tokens per training example (loss on them)")
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank on the base (0 = no LoRA), as in training")
    p.add_argument("--encoder-multiplier", type=float, default=None,
                   help="f in the merge encoders' hidden size int(f*K)*d, as model.encoder_multiplier (default: the paper's rule)")
    p.add_argument("--encoder-shape", choices=list(SHAPES), default="paper",
                   help="the merge encoders' layers, as model.encoder_shape (ktm/encoder.py)")
    p.add_argument("--merged", action=argparse.BooleanOptionalAction, default=True,
                   help="also time TTFT with the LoRA merged into a copy of the base (KTMModel.merged_for_serving), "
                   "at every K (skipped without LoRA)")
    p.add_argument("--peak-size", type=int, default=None,
                   help="side of the square GEMM that measures the matmul peak in float32 and bfloat16; 0 skips it "
                   "(default: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda when present")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto = bfloat16 on CUDA and on CPUs that compute it natively (AVX512-BF16, AMX), else float32")
    p.add_argument("--compile", action="store_true",
                   help="time TTFT, ceiling and merged TTFT with the LM under torch.compile (inductor), as a server "
                   "would run it; each shape compiles in the warm-up round (tens of seconds on CPU); the training "
                   "step stays eager")
    p.add_argument("--attention", choices=CHOICES, default="auto",
                   help="the LM's attention kernel: sdpa (PyTorch's), eager (transformers'), blocked_causal "
                   "(ktm/attention.py: blocks of queries as GEMMs); auto = blocked_causal on CPU (1.16-1.27x faster "
                   "bf16 prefills than sdpa on 2 EPYC cores, README Speed), sdpa on CUDA")
    p.add_argument("--versus-attention", choices=[c for c in CHOICES if c != "auto"], default=None, metavar="KERNEL",
                   help="also time the ceiling with this attention kernel in every round, right after the ceiling with "
                   "--attention's, and report their per-round ratio (one kernel against another, each round's noise "
                   "shared)")
    p.add_argument("--profile", action="store_true",
                   help="after each (batch, length), profile one bare-base prefill at K=1 (the ceiling) and write "
                   "its operator table, by self time, to prefill_profile.txt: where the time below the matmul peak goes")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts and embeddings")
    p.add_argument("--name", default=None, help="output folder name under --out-root (default: a timestamp)")
    p.add_argument("--out-root", default="checkpoints/bench", help="folder that holds all benchmark outputs")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise KTMError("--device cuda but torch sees no CUDA device", "use --device cpu or install a CUDA build of torch")
    if a.dtype == "auto":
        from ktm.environment import cpu_has_native_bf16  # emulated bf16 is ~100x slower than float32 (README Speed)

        a.dtype = "bfloat16" if a.device == "cuda" or cpu_has_native_bf16() else "float32"
    for key, value in DEFAULTS[a.device].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.attention = resolve(a.attention, a.device)  # auto: the device's kernel (ktm.attention.AUTO)
    for name in ("ks", "lengths", "batch_sizes"):
        bad = [v for v in getattr(a, name) if v < 1]
        if bad:
            raise KTMError(f"--{name.replace('_', '-')} must be whole numbers >= 1, got {bad[0]}", "e.g. --ks 1 2 4 8")
    for name, low in (("repeats", 1), ("warmup", 0), ("decode_tokens", 0), ("train_length", 0), ("train_batch", 1),
                      ("train_target_tokens", 1), ("lora_r", 0), ("threads", 1), ("peak_size", 0)):
        v = getattr(a, name)
        if v is not None and v < low:
            raise KTMError(f"--{name.replace('_', '-')} must be >= {low}, got {v}", "see ktm bench --help")
    a.ks = sorted(set(a.ks) | {1})
    a.lengths, a.batch_sizes = sorted(set(a.lengths)), sorted(set(a.batch_sizes))
    short = [n for n in a.lengths + ([a.train_length] if a.train_length else []) if n < a.ks[-1]]
    if short:
        raise KTMError(f"prompt length {short[0]} is shorter than K={a.ks[-1]}: nothing would be merged",
                       "use lengths of at least the largest K")
    if a.train_length and a.lora_r == 0:
        raise KTMError("the training step needs LoRA (at K=1 nothing else trains)", "use --lora-r >= 1 or --train-length 0")
    a.bases = [resolve_model(m) for m in a.models]
    return a


def resolve_model(name: str) -> str:
    from ktm.base import CONFIG_SHAPES

    if name in MODELS:
        return MODELS[name]
    if name.startswith("config:") and name.split(":", 1)[1] in CONFIG_SHAPES:
        return name
    raise KTMError(f"unknown bench model {name!r}", f"use one of: {', '.join(MODELS)} (or config:<shape>)")


# -- clocks, statistics, memory ------------------------------------------------------------------
class Clock:
    """Seconds from `clock` (perf_counter; tests inject a scripted one). On CUDA it first waits for queued
    work, so a part's time is its own."""

    def __init__(self, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.cuda, self.clock = device.type == "cuda", clock

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()


def timed(fn: Callable[[], object], clock: Clock) -> float:
    t0 = clock.now()
    fn()
    return clock.now() - t0


def stats(values: list[float]) -> dict:
    """Median, min/max, quartiles, and the values themselves in run order (ratios pair them by round)."""
    t = torch.tensor(values, dtype=torch.float64)
    q1, med, q3 = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median": med, "min": min(values), "max": max(values), "q1": q1, "q3": q3, "n": len(values),
            "values": list(values)}


def per_round(num: list[float], den: list[float]) -> dict:
    """stats of num[r] / den[r]: each pair was measured in the same round, seconds apart."""
    if len(num) != len(den):
        raise ValueError(f"per-round ratio of {len(num)} and {len(den)} values")
    return stats([n / d for n, d in zip(num, den)])


def run_rounds(steps: dict, repeats: int, warmup: int) -> dict[object, list]:
    """Run every step once per round in the dict's order: `warmup` untimed rounds, then `repeats` rounds
    whose results are returned per step, in round order. A step returns its own measurement (seconds,
    tokens/s or a record); run_rounds only sets the order."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    results: dict[object, list] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            results[key].append(step())
    return results


class PeakMemory:
    """Peak memory of a region above what was held before it.

    CUDA: torch.cuda.max_memory_allocated. CPU: tracemalloc does not see torch's buffers, so the process
    RSS: Linux's peak (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus the RSS before; freed heap
    is returned first (malloc_trim) so reused memory shows. Without /proc it falls back to psutil's RSS
    after minus before, which misses a peak freed inside the region."""

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated delta" if device.type == "cuda" else self._cpu_method()
        self.before = 0

    @staticmethod
    def _cpu_method() -> str:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if status_kib("VmHWM") is not None:
                return "peak RSS (VmHWM after clear_refs) minus RSS before"
        except OSError:
            pass
        return "psutil RSS after minus before"

    @staticmethod
    def _rss() -> int:
        rss = rss_bytes()
        if rss is not None:
            return rss
        import psutil

        return psutil.Process().memory_info().rss

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return
        release_freed_heap()
        self.before = self._rss()
        if self.method.startswith("peak RSS"):
            Path("/proc/self/clear_refs").write_text("5")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        after = status_kib("VmHWM") * 1024 if self.method.startswith("peak RSS") else self._rss()
        return max(0, after - self.before)


def kv_cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a forward returned (a transformers Cache or legacy tuples)."""
    seen: set[int] = set()

    def walk(obj) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, (list, tuple)):
            return sum(walk(o) for o in obj)
        if hasattr(obj, "layers"):  # transformers >= 4.56 Cache: one layer object per decoder layer
            return sum(walk([getattr(layer, "keys", None), getattr(layer, "values", None)]) for layer in obj.layers)
        if hasattr(obj, "key_cache"):  # older DynamicCache
            return walk(obj.key_cache) + walk(obj.value_cache)
        return 0

    return walk(cache)


# -- analytic FLOPs --------------------------------------------------------------------------------
def _linear_macs(module: nn.Module, skip: str | None = None, lora: bool = True) -> tuple[int, int]:
    """(MACs per position of all Linear layers outside `skip`, MACs of those inside it). LoRA's A/B
    matrices are Linear layers of their own, so they count too unless lora=False (the bare base)."""
    body = head = 0
    for name, m in module.named_modules():
        if not lora and any(part.startswith("lora_") for part in name.split(".")):
            continue
        if isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
            if skip and skip in name.split("."):
                head += macs
            else:
                body += macs
    return body, head


def base_config(model):
    lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
    return lm.config


def prefill_flops(model, batch: int, length: int, lora: bool = True) -> float:
    """FLOPs of a prefill of `length` positions: linear layers at every position, the LM head (with its
    LoRA) at the one kept position, causal attention (QK^T and AV over L(L+1)/2 query-key pairs).
    lora=False counts the bare base (the ceiling, or a model whose LoRA is merged into its weights).
    Norms, activations and RoPE are left out: a few percent at most."""
    cfg = base_config(model)
    body, head = _linear_macs(model.lm, skip="lm_head", lora=lora)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    attn = 2 * heads * head_dim * length * (length + 1) / 2 * cfg.num_hidden_layers
    return 2.0 * batch * (body * length + head + attn)


def encoder_flops(model, k: int, batch: int, blocks: int) -> float:
    body, _ = _linear_macs(model._encoder(k))
    return 2.0 * batch * blocks * body


# -- prompts -----------------------------------------------------------------------------------------
def make_texts(model, n: int, batch: int, seed: int) -> list[str]:
    """`batch` different random texts that the model's tokenizer turns into exactly n tokens."""
    tok = model.tokenizer
    specials = len(tok("x", add_special_tokens=True)["input_ids"]) - len(tok("x", add_special_tokens=False)["input_ids"])
    texts = []
    for row in range(batch):
        rng = random.Random(seed * 1000003 + row)
        words = " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7))) for _ in range(n))
        ids = tok(words, add_special_tokens=False)["input_ids"]  # every word is >= 1 token: >= n tokens
        body = n - specials
        for j in sorted(range(-8, 9), key=abs):  # a cut can merge/split at the seam: try nearby cuts
            text = tok.decode(ids[: max(0, body + j)])
            if len(tok(text, add_special_tokens=True)["input_ids"]) == n:
                texts.append(text)
                break
        else:
            raise KTMError(f"could not build a prompt of exactly {n} tokens for this tokenizer", "try another --lengths")
    got = [len(r) for r in model.tokenize_prompts(texts)]  # the model's own check (context limit, ...)
    assert got == [n] * batch, got
    return texts


# -- measurements -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _part_timers(modules: dict[str, nn.Module], clock: Clock, totals: dict[str, float]):
    """Add each module's forward time to totals[name] (hooks on the model's own modules)."""
    handles, starts = [], {}
    for name, mod in modules.items():
        totals[name] = 0.0

        def pre(_m, _i, name=name):
            starts[name] = clock.now()

        def post(_m, _i, _o, name=name):
            totals[name] += clock.now() - starts[name]

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def e2e_once(model, texts: list[str], k: int, clock: Clock) -> tuple[float, dict, object, object]:
    """One TTFT run with generate_ids' own calls: returns (total s, parts s, batch, prefill output)."""
    parts: dict[str, float] = {}
    with _part_timers({"embed": model.embed, "encoder": model._encoder(k)}, clock, parts):
        t0 = clock.now()
        ids = model.tokenize_prompts(texts)
        t1 = clock.now()
        batch = model.build_batch(ids, k)
        t2 = clock.now()
        out = model.prefill(batch)
        t3 = clock.now()
        model.pick(out.logits[:, -1]).tolist()  # the first token, on the host
        t4 = clock.now()
    parts.update(tokenize=t1 - t0, layout=(t2 - t1) - parts["embed"] - parts["encoder"], prefill=t3 - t2, first_token=t4 - t3)
    return t4 - t0, parts, batch, out


@torch.no_grad()
def ceiling_once(model, embeds: torch.Tensor, clock: Clock) -> float:
    """Prefill of the bare base (LoRA off) on given embeddings: no tokenizer, no encoder, no padding; the LM
    head on the last position as KTMModel.prefill runs it (last_positions)."""
    from ktm.model import last_positions

    B, L, _ = embeds.shape
    mask = torch.ones(B, L, dtype=torch.long, device=embeds.device)
    pos = torch.arange(L, device=embeds.device).expand(B, L)
    with model.bare_base():
        t0 = clock.now()
        out = model.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                       logits_to_keep=last_positions(1, L, embeds.device), use_cache=True)
        t1 = clock.now()
    del out
    return t1 - t0


def ceiling_with(model, kernel: str, embeds: torch.Tensor, clock: Clock) -> float:
    """ceiling_once with the LM's attention switched to `kernel` for this call only (the switch is not timed)."""
    mine = model.attention
    model.use_attention(kernel)
    try:
        return ceiling_once(model, embeds, clock)
    finally:
        model.use_attention(mine)


@torch.no_grad()
def decode_once(model, batch, out, steps: int, clock: Clock) -> float:
    """Tokens/s of `steps` greedy steps on the prefill's KV cache with generate_ids' calls (decode_step,
    pick; EOS ignored so every run decodes the same number of tokens). The cache is cropped back to the
    prefill afterwards, so one prefill serves every repeat."""
    cache, L = out.past_key_values, batch.inputs_embeds.shape[1]
    mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
    nxt = model.pick(out.logits[:, -1])
    t0 = clock.now()
    for _ in range(steps):
        step, mask, pos = model.decode_step(nxt, mask, pos, cache)
        nxt = model.pick(step.logits[:, -1])
        bool((nxt == model.eos_id).all())  # generate_ids checks for EOS on the host every step
    t1 = clock.now()
    cache.crop(-(cache.get_seq_length() - L))  # negative = tokens to drop (old and new transformers)
    return steps * mask.shape[0] / (t1 - t0)


def train_step_once(model, opt, texts: list[str], targets: list[str], k: int, clock: Clock) -> float:
    """One training step as KTMModule.training_step + the optimizer: tokenise, build_batch, target NLL,
    backward, AdamW."""
    t0 = clock.now()
    b = model.build_batch(model.tokenize_prompts(texts), k, model.tokenize_targets(targets))
    nll, counts, _ = model.target_nll(b)
    (nll.sum() / counts.sum().clamp(min=1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clock.now() - t0


def matmul_peak(device: torch.device, dtype: str, size: int, repeats: int, clock: Clock) -> dict:
    """The machine's own dense-matmul rate: a size x size x size GEMM (2*size^3 FLOPs), one warm-up, then
    `repeats` timed products. GFLOP/s of the median run, and of the fastest."""
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(size, size, generator=gen).to(device, getattr(torch, dtype)) for _ in range(2))
    torch.mm(x, y)
    s = stats([timed(lambda: torch.mm(x, y), clock) for _ in range(repeats)])
    flops = 2.0 * size**3
    return {"dtype": dtype, "size": size, "gflops": flops / s["median"] / 1e9, "best_gflops": flops / s["min"] / 1e9,
            "time_s": s}


def matmul_peaks(a, device: torch.device, clock: Clock) -> dict[str, dict]:
    """float32 and bfloat16 always (bf16 on a CPU without native bf16 is emulated: the table shows what
    that costs), plus the run's own dtype."""
    out = {}
    for dtype in dict.fromkeys(["float32", "bfloat16", a.dtype]):
        out[dtype] = matmul_peak(device, dtype, a.peak_size, a.repeats, clock)
        log.info("bench: matmul peak %s %d^3: %.1f GFLOP/s", dtype, a.peak_size, out[dtype]["gflops"])
    return out


def ceiling_embeds(model, texts: list[str], k: int, seed: int, device: torch.device) -> torch.Tensor:
    """Random embeddings of K's merged length, at the scale of the real table (the values do not matter
    for speed, the shape does)."""
    gen = torch.Generator(device="cpu").manual_seed(seed + k)
    L = int(model.build_batch(model.tokenize_prompts(texts[:1]), k).merged_tokens[0])
    scale = float(model.embed.weight.float().std())
    return (torch.randn(len(texts), L, model.hidden_size, generator=gen) * scale).to(device, model.embed.weight.dtype)


def e2e_record(model, texts: list[str], k: int, clock: Clock, mem: PeakMemory, kept: dict) -> dict:
    """One e2e run with its peak memory; keeps its (batch, output) in kept[k] for KV bytes and decode."""
    kept.pop(k, None)  # free this K's previous cache first: the peak is this run's alone
    mem.start()
    total, parts, batch, out = e2e_once(model, texts, k, clock)
    peak = mem.stop()
    kept[k] = (batch, out)
    return {"s": total, "parts": parts, "peak": peak}


def merged_once(served, texts: list[str], k: int, clock: Clock) -> float:
    """TTFT e2e of the model whose LoRA is merged into its weights (merged_for_serving)."""
    return e2e_once(served, texts, k, clock)[0]


def group_steps(model, served, texts: list[str], a, clock: Clock, mem: PeakMemory, device, kept: dict) -> dict:
    """One round of a (batch, length): K=1 e2e, K=1 ceiling[, K=1 merged], K=2 e2e, ... in that order."""
    steps = {}
    for k in a.ks:
        embeds = ceiling_embeds(model, texts, k, a.seed, device)
        steps[("e2e", k)] = functools.partial(e2e_record, model, texts, k, clock, mem, kept)
        steps[("ceiling", k)] = functools.partial(ceiling_once, model, embeds, clock)
        if a.versus_attention:
            steps[("versus", k)] = functools.partial(ceiling_with, model, a.versus_attention, embeds, clock)
        if served is not None:
            steps[("merged", k)] = functools.partial(merged_once, served, texts, k, clock)
    return steps


def point_row(model, texts: list[str], k: int, res: dict, kept: dict) -> dict:
    """The row of one K from the rounds' results (times in round order, so add_speedups can pair them)."""
    recs, (batch, out) = res[("e2e", k)], kept[k]
    B, N, L = len(texts), int(batch.prompt_tokens[0]), int(batch.merged_tokens[0])
    row = {"batch": B, "length": N, "k": k, "merged_length": L,
           "ttft_e2e_s": stats([r["s"] for r in recs]), "ceiling_s": stats(res[("ceiling", k)]),
           "parts_s": {p: stats([r["parts"][p] for r in recs])["median"] for p in PARTS},
           "kv_cache_bytes": kv_cache_bytes(out.past_key_values),
           "peak_memory_bytes": int(stats([r["peak"] for r in recs])["median"])}
    row["prompt_tokens_per_s"] = B * N / row["ttft_e2e_s"]["median"]
    if ("merged", k) in res:
        row["ttft_merged_s"] = stats(res[("merged", k)])
    if ("versus", k) in res:
        row["ceiling_versus_s"] = stats(res[("versus", k)])
    enc, pre = row["parts_s"]["encoder"], row["parts_s"]["prefill"]
    row["encoder_share"] = enc / pre if k > 1 else None
    row["encoder_flop_share"] = encoder_flops(model, k, B, N // k) / prefill_flops(model, B, L) if k > 1 else None
    return row


def measure_group(model, served, texts: list[str], a, clock: Clock, mem: PeakMemory, device) -> list[dict]:
    """Every K of one (batch, length) in interleaved rounds (group_steps), then decode in rounds too."""
    kept: dict[int, tuple] = {}
    res = run_rounds(group_steps(model, served, texts, a, clock, mem, device, kept), a.repeats, a.warmup)
    rows = [point_row(model, texts, k, res, kept) for k in a.ks]
    if a.decode_tokens:
        steps = {k: functools.partial(decode_once, model, *kept[k], a.decode_tokens, clock) for k in a.ks}
        dec = run_rounds(steps, a.repeats, a.warmup)
        for row in rows:
            row["decode_tokens_per_s"] = stats(dec[row["k"]])
    return rows


def add_flop_rates(rows: list[dict], model, peak: dict | None) -> None:
    """Achieved GFLOP/s of the e2e prefill part (LoRA on) and of the ceiling (bare base), analytic FLOPs
    (prefill_flops) over the median time, and each as a fraction of the measured matmul peak."""
    for r in rows:
        B, L = r["batch"], r["merged_length"]
        r["prefill_gflops"] = prefill_flops(model, B, L) / r["parts_s"]["prefill"] / 1e9
        ceiling_flops = prefill_flops(model, B, L, lora=False)
        r["ceiling_gflops"] = ceiling_flops / r["ceiling_s"]["median"] / 1e9
        if "ceiling_versus_s" in r:  # the same ceiling with --versus-attention's kernel
            r["ceiling_versus_gflops"] = ceiling_flops / r["ceiling_versus_s"]["median"] / 1e9
        if peak:
            r["prefill_fraction_of_peak"] = r["prefill_gflops"] / peak["gflops"]
            r["ceiling_fraction_of_peak"] = r["ceiling_gflops"] / peak["gflops"]
            if "ceiling_versus_gflops" in r:
                r["ceiling_versus_fraction_of_peak"] = r["ceiling_versus_gflops"] / peak["gflops"]


def train_record(model, opt, texts, answer, k: int, clock: Clock, mem: PeakMemory) -> dict:
    mem.start()
    t = train_step_once(model, opt, texts, answer, k, clock)
    return {"s": t, "peak": mem.stop()}


def measure_training(model, a, clock, mem) -> list[dict]:
    """One training step per K, in interleaved rounds like the TTFT (one optimizer per K)."""
    texts = make_texts(model, a.train_length, a.train_batch, a.seed + 7)
    answer = make_texts(model, a.train_target_tokens, a.train_batch, a.seed + 8)
    model.train()
    try:
        steps = {}
        for k in a.ks:
            opt = torch.optim.AdamW(list(model._encoder(k).parameters()) + model.trainable_parameters()["lora"], lr=1e-4)
            steps[k] = functools.partial(train_record, model, opt, texts, answer, k, clock, mem)
        res = run_rounds(steps, a.repeats, a.warmup)
    finally:
        model.eval()
    rows = []
    for k in a.ks:
        s = stats([r["s"] for r in res[k]])
        rows.append({"batch": a.train_batch, "length": a.train_length, "k": k, "step_s": s,
                     "samples_per_s": a.train_batch / s["median"],
                     "prompt_tokens_per_s": a.train_batch * a.train_length / s["median"],
                     "peak_memory_bytes": max(r["peak"] for r in res[k])})
        log.info("bench: train K=%d step %.3fs", k, s["median"])
    add_train_targets(rows)
    return rows


def add_train_targets(rows: list[dict]) -> None:
    """Per-sample speed-up vs K=1 per round (same batch size, so step-time ratio), median and range."""
    base = next(r for r in rows if r["k"] == 1)
    for r in rows:
        s = per_round(base["step_s"]["values"], r["step_s"]["values"])
        r["speedup_per_sample"], r["speedup_per_sample_range"] = s["median"], [s["min"], s["max"]]
        r["targets"] = {"faster_per_sample_than_K=1": "PASS" if r["speedup_per_sample"] > 1 else "MISS"} if r["k"] == 4 else {}


def _values(r: dict, key: str) -> list[float]:
    return r[key]["values"]


def add_speedups(rows: list[dict]) -> None:
    """Speed-ups vs K=1 of the same (model, batch, length), computed per round and summarised as median
    [min, max]; fraction of ceiling per round too; merged-LoRA ratios; decode vs K=1; targets.
    `*_of_medians` keeps the ratio of the medians for comparison."""
    for r in rows:
        base = next(b for b in rows if (b["model"], b["batch"], b["length"], b["k"]) == (r["model"], r["batch"], r["length"], 1))
        e2e = per_round(_values(base, "ttft_e2e_s"), _values(r, "ttft_e2e_s"))
        ceil = per_round(_values(base, "ceiling_s"), _values(r, "ceiling_s"))
        frac = per_round(e2e["values"], ceil["values"])
        r["speedups"] = {"e2e": e2e, "ceiling": ceil, "fraction_of_ceiling": frac}
        r["e2e_speedup"], r["ceiling_speedup"], r["fraction_of_ceiling"] = e2e["median"], ceil["median"], frac["median"]
        r["e2e_speedup_of_medians"] = base["ttft_e2e_s"]["median"] / r["ttft_e2e_s"]["median"]
        r["ceiling_speedup_of_medians"] = base["ceiling_s"]["median"] / r["ceiling_s"]["median"]
        if "ttft_merged_s" in r:
            merged = _values(r, "ttft_merged_s")
            r["speedups"]["unmerged_over_merged"] = per_round(_values(r, "ttft_e2e_s"), merged)  # the LoRA's cost
            r["speedups"]["merged_over_ceiling"] = per_round(merged, _values(r, "ceiling_s"))  # what is left above the base
            r["speedups"]["merged_vs_unmerged_k1"] = per_round(_values(base, "ttft_e2e_s"), merged)
        if "ceiling_versus_s" in r:  # how much faster --attention's ceiling is than --versus-attention's
            r["speedups"]["attention_vs_versus"] = per_round(_values(r, "ceiling_versus_s"), _values(r, "ceiling_s"))
        if "decode_tokens_per_s" in r:
            r["decode_vs_k1"] = per_round(_values(r, "decode_tokens_per_s"), _values(base, "decode_tokens_per_s"))["median"]
        targets = {}
        if r["k"] == TARGET_FRACTION_K:
            targets[f"fraction_of_ceiling>={TARGET_FRACTION}"] = r["fraction_of_ceiling"] >= TARGET_FRACTION
        if r["length"] == TARGET_ENCODER_LENGTH and r["k"] > 1:
            targets[f"encoder_share<={TARGET_ENCODER_SHARE:.0%}"] = r["encoder_share"] <= TARGET_ENCODER_SHARE
        r["targets"] = {name: "PASS" if ok else "MISS" for name, ok in targets.items()}


# -- reporting ------------------------------------------------------------------------------------------
def device_info(a, device: torch.device) -> dict:
    import transformers

    from ktm.environment import cpu_has_native_bf16

    info = {"device": a.device, "dtype": a.dtype, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(), "platform": platform.platform(),
            "compiled": a.compile, "attention": a.attention, "versus_attention": a.versus_attention,
            "encoder_multiplier": a.encoder_multiplier, "encoder_shape": a.encoder_shape}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    info.setdefault("cpu", platform.processor() or platform.machine())
    info["cpu_count"] = os.cpu_count()
    info["cpu_native_bf16"] = cpu_has_native_bf16()  # without it CPU bf16 matmuls are emulated
    return info


def where(dev: dict) -> str:
    return dev.get("gpu") or dev["cpu"]


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1%}"


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f}"


def _ratio(s: dict, unit: str = "x") -> str:
    """A per-round ratio: median [min–max]."""
    return f"{s['median']:.2f}{unit} [{s['min']:.2f}–{s['max']:.2f}]"


def _peak_lines(result: dict) -> list[str]:
    peaks, dev = result["meta"].get("matmul_peak") or {}, result["meta"]["device_info"]
    if not peaks:
        return []
    rates = ", ".join(f"{d} {p['gflops']:.1f} GFLOP/s (best {p['best_gflops']:.1f})" for d, p in peaks.items())
    size = next(iter(peaks.values()))["size"]
    bf16 = "" if dev["device"] == "cuda" else f" CPU has native bf16: {'yes' if dev.get('cpu_native_bf16') else 'no (emulated)'}."
    return [f"Matmul peak ({size}x{size}x{size} GEMM, median run): {rates}.{bf16}", ""]


def _main_table(rows: list[dict]) -> list[str]:
    lines = [
        "| model | batch | length | K | merged | TTFT e2e ms [min–max] | ceiling ms | e2e speed-up [min–max] | "
        "ceiling speed-up [min–max] | fraction of ceiling [min–max] | enc share (FLOPs) | KV cache MiB | peak mem MiB | "
        "decode tok/s (vs K=1) | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, c, sp = r["ttft_e2e_s"], r["ceiling_s"], r["speedups"]
        dec = "—"
        if "decode_tokens_per_s" in r:
            dec = f"{r['decode_tokens_per_s']['median']:.1f} ({r['decode_vs_k1']:.2f}x)"
        enc = "—" if r["encoder_share"] is None else f"{_pct(r['encoder_share'])} ({_pct(r['encoder_flop_share'])})"
        tg = "; ".join(f"{n} {v}" for n, v in r["targets"].items()) or ""
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {r['merged_length']} | "
                     f"{_ms(t['median'])} [{_ms(t['min'])}–{_ms(t['max'])}] | {_ms(c['median'])} | "
                     f"{_ratio(sp['e2e'])} | {_ratio(sp['ceiling'])} | {_ratio(sp['fraction_of_ceiling'], '')} | {enc} | "
                     f"{_mib(r['kv_cache_bytes'])} | {_mib(r['peak_memory_bytes'])} | {dec} | {tg} |")
    return lines


def _split_table(rows: list[dict]) -> list[str]:
    lines = ["TTFT split (medians, ms):", "",
             "| model | batch | length | K | " + " | ".join(PARTS) + " |", "|---|---|---|---|" + "---|" * len(PARTS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | "
                     + " | ".join(_ms(r["parts_s"][p]) for p in PARTS) + " |")
    return lines


def _compute_table(rows: list[dict]) -> list[str]:
    lines = ["Compute: analytic prefill FLOPs (`prefill_flops`: linear layers incl. LoRA at every position, LM head at "
             "the last, causal attention) over the median prefill time; % of the matmul peak of the run's dtype. "
             "Prompt tokens/s = batch x length / TTFT e2e.", "",
             "| model | batch | length | K | merged | prefill GFLOP/s (% peak) | ceiling GFLOP/s (% peak) | prompt tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pre = f"{r['prefill_gflops']:.1f} ({_pct(r.get('prefill_fraction_of_peak'))})"
        ceil = f"{r['ceiling_gflops']:.1f} ({_pct(r.get('ceiling_fraction_of_peak'))})"
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {r['merged_length']} | {pre} | {ceil} | "
                     f"{r['prompt_tokens_per_s']:.0f} |")
    return lines


def _merged_table(rows: list[dict]) -> list[str]:
    sel = [r for r in rows if "ttft_merged_s" in r]
    if not sel:
        return []
    lines = ["", "Serving with the LoRA merged into the base weights (`KTMModel.merged_for_serving`), TTFT e2e medians "
             "in ms; ratios per round, median [min–max]:", "",
             "| model | batch | length | K | unmerged | merged | ceiling | unmerged / merged | merged / ceiling | "
             "merged vs unmerged K=1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        sp = r["speedups"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {_ms(r['ttft_e2e_s']['median'])} | "
                     f"{_ms(r['ttft_merged_s']['median'])} | {_ms(r['ceiling_s']['median'])} | "
                     f"{_ratio(sp['unmerged_over_merged'])} | {_ratio(sp['merged_over_ceiling'])} | "
                     f"{_ratio(sp['merged_vs_unmerged_k1'])} |")
    return lines


def _versus_table(rows: list[dict], dev: dict) -> list[str]:
    sel = [r for r in rows if "ceiling_versus_s" in r]
    if not sel:
        return []
    mine, theirs = dev.get("attention", "sdpa"), dev.get("versus_attention")
    lines = ["", f"Ceiling (bare-base prefill) with attention `{mine}` against `{theirs}`, both in every round, back to "
             "back; ms median [min–max], % of the matmul peak, ratio per round:", "",
             f"| model | batch | length | K | positions | {theirs} ms | {mine} ms | {theirs} % peak | {mine} % peak | "
             f"{theirs} / {mine} |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
        v, c = r["ceiling_versus_s"], r["ceiling_s"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {r['merged_length']} | "
                     f"{_ms(v['median'])} [{_ms(v['min'])}–{_ms(v['max'])}] | {_ms(c['median'])} [{_ms(c['min'])}–{_ms(c['max'])}] | "
                     f"{_pct(r.get('ceiling_versus_fraction_of_peak'))} | {_pct(r.get('ceiling_fraction_of_peak'))} | {_ratio(r['speedups']['attention_vs_versus'])} |")
    return lines


def _train_table(train: list[dict]) -> list[str]:
    if not train:
        return []
    lines = ["", "Training step (tokenise + build_batch + forward + backward + AdamW, LoRA + encoder):", "",
             "| model | batch | length | K | step ms [min–max] | samples/s | prompt tokens/s | per-sample speed-up [min–max] | "
             "peak mem MiB | targets |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in train:
        s, lo_hi = r["step_s"], r["speedup_per_sample_range"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['length']} | {r['k']} | {_ms(s['median'])} "
                     f"[{_ms(s['min'])}–{_ms(s['max'])}] | {r['samples_per_s']:.2f} | {r['prompt_tokens_per_s']:.0f} | "
                     f"{r['speedup_per_sample']:.2f}x [{lo_hi[0]:.2f}–{lo_hi[1]:.2f}] | {_mib(r['peak_memory_bytes'])} | "
                     + "; ".join(f"{n} {v}" for n, v in r["targets"].items()) + " |")
    return lines


def markdown(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    dev = meta["device_info"]
    lines = [
        f"# ktm bench: {meta['name']}", "",
        f"Device: {dev['device']} ({where(dev)}), {dev['threads']} threads, dtype {dev['dtype']}, torch {dev['torch']}, "
        f"transformers {dev['transformers']}{', LM under torch.compile' if dev.get('compiled') else ', eager'}, "
        f"attention {dev.get('attention', 'sdpa')}. "
        f"{meta['weights_note']}", "",
        f"Command: `{meta['command']}`", "",
        *_peak_lines(result),
        f"{meta['args']['warmup']} warm-up rounds, then {meta['args']['repeats']} timed rounds; one round runs every K's "
        "e2e, ceiling and merged TTFT back to back. Times: median [min–max]. Speed-ups vs K=1: computed per round "
        "(both times from the same round), median [min–max] of those. TTFT e2e = tokenise + embed + merge encoder + "
        "layout + prefill (LoRA on) + first token. Ceiling = bare-base prefill of a random embedding sequence of the "
        "merged length. Fraction = e2e speed-up / ceiling speed-up. Enc share = encoder time / compressed prefill "
        f"time (FLOP ratio in brackets). Peak mem = {meta['memory_method']}.", "",
        *_main_table(rows), "", *_split_table(rows), "", *_compute_table(rows), *_merged_table(rows),
        *_versus_table(rows, dev),
        *_train_table(result["train"]),
    ]
    lines += ["", "Targets:", ""] + [f"- {t['target']}: {t['status']} ({t['detail']})" for t in result["targets"]]
    return "\n".join(lines) + "\n"


def target_summary(rows: list[dict], train: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        for name, status in r["targets"].items():
            value = r["fraction_of_ceiling"] if name.startswith("fraction") else r["encoder_share"]
            out.append({"target": f"{name} ({r['model']}, B={r['batch']}, N={r['length']}, K={r['k']})", "status": status,
                        "detail": f"measured {value:.3f}" + (f", FLOP ratio {r['encoder_flop_share']:.3f}"
                                                             if name.startswith("encoder") else "")})
    for r in train:
        for name, status in r["targets"].items():
            out.append({"target": f"K=4 trains {name.replace('_', ' ')} ({r['model']}, B={r['batch']}, N={r['length']})",
                        "status": status, "detail": f"{r['speedup_per_sample']:.2f}x samples/s of K=1"})
    return out


def _errorbar(ax, pts: list[dict], key: str, fmt: str, color: str, label: str, alpha: float = 1.0) -> None:
    """Per-round median with its min-max as the error bar."""
    med = [p["speedups"][key]["median"] for p in pts]
    low = [m - p["speedups"][key]["min"] for m, p in zip(med, pts)]
    high = [p["speedups"][key]["max"] - m for m, p in zip(med, pts)]
    ax.errorbar([p["k"] for p in pts], med, yerr=[low, high], fmt=fmt, color=color, alpha=alpha, capsize=3, label=label)


def speedup_figure(rows: list[dict], dev: dict):
    """One panel per (model, batch): e2e and ceiling speed-up vs K for each prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.8), squeeze=False)
    for ax, (model, batch) in zip(axes[0], groups):
        sel = [r for r in rows if (r["model"], r["batch"]) == (model, batch)]
        ks = sorted({r["k"] for r in sel})
        for i, n in enumerate(sorted({r["length"] for r in sel})):
            pts = sorted((r for r in sel if r["length"] == n), key=lambda r: r["k"])
            _errorbar(ax, pts, "e2e", "o-", f"C{i}", f"N={n} tokens: e2e")
            _errorbar(ax, pts, "ceiling", "s--", f"C{i}", f"N={n} tokens: ceiling (bare base)", alpha=0.6)
        ax.plot(ks, ks, ":", color="grey", label="speed-up = K")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (prompt tokens merged into one)")
        ax.set_ylabel("TTFT speed-up vs K=1 (same prompt length N)")
        ax.set_title(f"{model}, batch {batch}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # Wrapped to the figure's width (about 64 title and 80 caption characters per 5.5-inch panel), so that a
    # single panel clips nothing (at 80 title characters the title ran past both edges).
    width = 80 * len(groups)
    title = textwrap.fill(f"TTFT speed-up on {dev['device']} ({where(dev)}), {dev['dtype']}: median of per-round "
                          "ratios, bars = min–max", 64 * len(groups))
    note = textwrap.fill("N = prompt length in tokens. e2e = tokenise + merge encoder + prefill with LoRA + first token. "
                         "ceiling = the bare base (no LoRA, no encoder) prefilling a sequence of the merged length N/K.",
                         int(width * 1.1))
    fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.035 * (note.count("\n") + 1) + 0.01, 1, 1 - 0.045 * (title.count("\n") + 1)))
    return fig


def plot(rows: list[dict], path: Path, dev: dict) -> None:
    from ktm.io import write_with

    fig = speedup_figure(rows, dev)  # selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------
def load_model(name: str, base: str, a, device):
    from ktm.model import KTMModel, LoraSettings

    log.info("bench: loading %s (%s, %s)", name, base, a.dtype)
    torch.manual_seed(a.seed)
    model = KTMModel.from_base(base, dtype=a.dtype, ks=a.ks, lora=LoraSettings(r=a.lora_r), encoder_multiplier=a.encoder_multiplier,
                               encoder_shape=a.encoder_shape).to(device).eval()
    model.use_attention(a.attention)
    too_long = [n for n in a.lengths + [a.train_length] if n > model.max_prompt_tokens]
    if too_long:
        raise KTMError(f"length {too_long[0]} is longer than {name}'s context of {model.max_prompt_tokens} tokens",
                       "use shorter --lengths / --train-length")
    return model


@contextlib.contextmanager
def compiled_lms(*models):
    """Each model's LM under torch.compile while inside (None entries skipped), the eager LM back afterwards.
    Shapes start static; a second shape (decode's growing cache) recompiles once with dynamic sizes. The limit
    on recompiles is raised so that no variant (adapters on and off, every length and K) falls back to eager."""
    import torch._dynamo

    limit = torch._dynamo.config.cache_size_limit
    torch._dynamo.config.cache_size_limit = max(limit, 64)
    eager = [(m, m.lm) for m in models if m is not None]
    try:
        for m, lm in eager:
            m.lm = torch.compile(lm)
        yield
    finally:
        for m, lm in eager:
            m.lm = lm
        torch._dynamo.config.cache_size_limit = limit


def measure_model(name: str, model, a, clock: Clock, mem: PeakMemory, device, peak: dict | None,
                  profiles: dict) -> tuple[list, list]:
    served = model.merged_for_serving() if a.merged and model.lora_settings is not None else None
    with compiled_lms(model, served) if a.compile else contextlib.nullcontext():
        rows = measure_prefills(name, model, served, a, clock, mem, device, peak, profiles)
    del served
    train = [{"model": name, **r} for r in measure_training(model, a, clock, mem)] if a.train_length else []
    return rows, train


def ceiling_profile(model, embeds: torch.Tensor, clock: Clock, rows: int = 15) -> str:
    """The operator table (self time, largest first) of one bare-base prefill, as ceiling_once runs it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if embeds.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = ceiling_once(model, embeds, clock)
    key = "self_device_time_total" if embeds.device.type == "cuda" else "self_cpu_time_total"
    return f"one prefill, {seconds:.3f} s under the profiler\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def measure_prefills(name: str, model, served, a, clock: Clock, mem: PeakMemory, device, peak: dict | None,
                     profiles: dict) -> list[dict]:
    rows = []
    for B in a.batch_sizes:
        for N in a.lengths:
            texts = make_texts(model, N, B, a.seed)
            group = measure_group(model, served, texts, a, clock, mem, device)
            if a.profile:
                profiles[f"{name}, batch {B}, {N} tokens, bare base (K=1 ceiling)"] = ceiling_profile(
                    model, ceiling_embeds(model, texts, 1, a.seed, device), clock)
            add_flop_rates(group, model, peak)
            for r in group:
                log.info("bench: %s B=%d N=%d K=%d  TTFT %.3fs  ceiling %.3fs", name, B, N, r["k"],
                         r["ttft_e2e_s"]["median"], r["ceiling_s"]["median"])
            rows += [{"model": name, **r} for r in group]
    return rows


def run(a: argparse.Namespace) -> dict:
    from ktm.environment import environment

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    clock, mem = Clock(device), PeakMemory(device)
    rows, train, peaks, profiles = [], [], None, {}
    for name, base in zip(a.models, a.bases):
        model = load_model(name, base, a, device)  # a bad length fails here, before any timing
        if peaks is None:  # once, before the first model's measurements
            peaks = matmul_peaks(a, device, clock) if a.peak_size else {}
        r, t = measure_model(name, model, a, clock, mem, device, peaks.get(a.dtype), profiles)
        rows, train = rows + r, train + t
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    weights = ("Random weights (config-built shapes): speed does not depend on weight values."
               if all(b.startswith("config:") for b in a.bases) else
               "Config shapes have random weights; smollm2-135m has its real weights (encoder/LoRA untrained).")
    args = {k: v for k, v in vars(a).items() if k != "bases"}
    return {"meta": {"name": a.name, "command": a.command, "args": args, "device_info": device_info(a, device),
                     "environment": environment(), "matmul_peak": peaks, "memory_method": mem.method,
                     "weights_note": weights, "created": datetime.now().isoformat(timespec="seconds")},
            "rows": rows, "train": train, "targets": target_summary(rows, train), "profiles": profiles}


def main(argv: list[str] | None = None) -> dict:
    from ktm.io import write_json, write_text

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    a.name = a.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    if not a.name or "/" in a.name or a.name.startswith("."):
        raise KTMError(f"--name {a.name!r} is not a plain folder name", "use letters, digits, - and _")
    a.command = " ".join(["ktm bench", *argv])
    out_dir = Path(a.out_root) / a.name
    result = run(a)
    md = markdown(result)
    write_json(out_dir / "results.json", result)
    write_text(out_dir / "results.md", md)
    plot(result["rows"], out_dir / "speedup.png", result["meta"]["device_info"])
    if result["profiles"]:
        write_text(out_dir / "prefill_profile.txt", "".join(f"## {where}\n{table}\n" for where, table in result["profiles"].items()))
    print(md)
    extra = ", prefill_profile.txt" if result["profiles"] else ""
    print(f"ktm bench: results in {out_dir}/ (results.json, results.md, speedup.png{extra})")
    return result
