"""KTMModel: a frozen causal LM + LoRA adapters + one merge encoder per K.

How a prompt of n tokens becomes a K-times shorter sequence (`build_batch`):

    [ head: r tokens ][ m blocks of K tokens -> m merged embeddings ][ tail: t tokens ][ target tokens ]
      r = (n - t) % K  (< K, left unmerged so no block mixes pad and real tokens)
      t = min(keep_tail + kept, n)  (0 = the paper: everything merged)

`kept` is the example's own kept span: a prompt given as a pair (text to merge, text to keep) has its
second text's tokens at its end, and they stay tokens (`encode_prompts`; benchmarks mark the span, used
with `model.keep_marked`). A plain string prompt has kept = 0. That is the `fixed` merge policy (the paper);
under `budget` (ktm.policy) each window of the body gets its own K by content, at K on average.

Sequences of a batch are then left-padded with zero vectors at the *sequence* level; pad positions are
masked out of attention and position ids count real positions only, so an example gives the same
result alone or in any batch. With `merged_positions: spread` a merged embedding takes the position of its
block's last token in the uncompressed prompt instead (0..n-1 spaced K apart over the blocks), and the answer
follows at n, n+1, ...: the base sees the rotary distances of the text it would have read. The target
(answer) stays in normal tokens; the loss is only on it. Generation prefills on the merged prompt once and
then decodes with the KV cache.

No Lightning here: serving and notebooks use this module directly.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ktm.encoder import SHAPES, MergeEncoder, encoder_parameters
from ktm.errors import KTMError, check_choice, check_count
from ktm.io import SIDECAR, atomic_dir, interrupted_save, read_json, sha256_file, text_size, verify, write_bytes, write_json, write_text
from ktm.policy import (MERGED_POSITIONS, TokenScores, budget_runs, check_policy, fixed_runs, layout_runs, moved_tokens,
                        runs_teacher_positions)

log = logging.getLogger("ktm")
# peft imports bitsandbytes when installed (lightning[extra] pulls it in); on CPUs with AVX512-BF16 it warns
# on every run about an optional 4-bit kernel package we never use. Only that module's warnings are muted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft still calls transformers' deprecated `is_gradient_checkpointing`; the FutureWarning is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

FORMAT_VERSION = 1
# Settings an export or checkpoint from before the setting existed lacks, with the value it then had (every reader
# of ktm.json and of checkpoint metadata takes a missing key from here: from_pretrained, init_from, resume).
UNRECORDED = {"encoder_bound": None, "compressor": "merge", "keep_marked": False, "encoder_shape": "paper",
              "long_prompt_policy": "error", "merge_policy": "fixed", "segment_tokens": 16, "policy_score": "surprisal",
              "merged_positions": "compact"}


def with_unrecorded(meta: Mapping[str, Any]) -> dict[str, Any]:
    """`meta` with each UNRECORDED setting it lacks at the value it then had."""
    return {**UNRECORDED, **meta}


# A prompt: a string (all of it merged K-to-1), or a pair (text to merge, text kept in tokens after it).
Prompt = Union[str, tuple[str, str]]
ALL_LINEAR, LM_HEAD = "all-linear", "lm_head"
# The paper's LoRA targets on any base: every linear layer of the transformer blocks (peft's `all-linear`, which
# leaves the output head out) plus the LM head. resolve_lora_targets turns them into the base's layer names.
DEFAULT_LORA_TARGETS = (ALL_LINEAR, LM_HEAD)
# What the default resolves to on a Llama-shaped base (the embedded SmolLM2), and what the default *was* before
# it became base-independent: checkpoints made with either spelling adapt the same modules.
LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
# Who teaches a merged student at K > 1 (model.distill_teacher): the frozen base, or the model itself at K=1.
DISTILL_TEACHERS = ("base", "k1")


@dataclass
class LoraSettings:
    """LoRA on the frozen base (peft). r=0 disables LoRA (encoder-only training)."""

    r: int = 4
    alpha: int = 16
    dropout: float = 0.05
    # [all-linear, lm_head] (the default, the paper): every linear layer of the blocks + the LM head, whatever the
    # base calls them; or layer names as peft takes them, e.g. [q_proj, v_proj]. `str` only to refuse peft's
    # bare "all-linear" string with a clear line (check_settings), not a traceback.
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


@dataclass
class Batch:
    inputs_embeds: torch.Tensor  # (B, L, d), left-padded with zeros
    attention_mask: torch.Tensor  # (B, L) 1 = real position
    position_ids: torch.Tensor  # (B, L) 0.. over real positions
    targets: torch.Tensor | None  # (B, T) right-aligned target ids, -100 = no target
    prompt_tokens: torch.Tensor  # (B,) original prompt length in tokens
    merged_tokens: torch.Tensor  # (B,) prompt length after merging
    adapted_tokens: torch.Tensor | None = None  # (B,) budget policy: prompt tokens at another K than the fixed layout's


def check_k(k) -> int:
    check_count("K", k, 1, "set model.ks to e.g. [1, 2, 4]")
    return k


def _number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def check_settings(ks, keep_tail=0, encoder_multiplier=None, max_prompt_tokens=None, long_prompt_policy="error",
                   lora: "LoraSettings | None" = None, encoder_bound=1.0, compressor="merge", keep_marked=False,
                   merge_policy="fixed", segment_tokens=16, policy_score="surprisal", encoder_shape="paper",
                   merged_positions="compact") -> list[int]:
    """Validate what a KTMModel is built from before any weights are loaded; return the sorted K values.

    Called by from_base before the base is loaded, so a bad config fails in a second, not after a download.
    """
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise KTMError(f"model.ks must be a non-empty list of K values, got {ks!r}", "set model.ks to e.g. [1, 2, 4]")
    ks = sorted({check_k(k) for k in ks})
    check_count("keep_tail", keep_tail, 0, "set model.keep_tail to 0 (paper) or e.g. 16")
    if not isinstance(keep_marked, bool):
        raise KTMError(f"model.keep_marked must be true or false, got {keep_marked!r}",
                       "set it to false (the paper: merge the whole prompt) or true (the benchmark's marked span stays in tokens)")
    if encoder_multiplier is not None:
        f = encoder_multiplier
        if not _number(f) or f <= 0:
            raise KTMError(f"model.encoder_multiplier must be a number > 0, got {f!r}", "set it to e.g. 1.5, or null for the paper's rule")
        # h = int(f*K)*d: a product below 1 leaves the encoder no hidden units, i.e. no size rule for that K.
        bad = [k for k in ks if k > 1 and int(f * k) < 1]
        if bad:
            raise KTMError(f"model.encoder_multiplier={f} gives the K={bad[0]} merge encoder no hidden units (int({f}*{bad[0]}) = 0)",
                           f"use encoder_multiplier >= {1 / bad[0]:g}, or null for the paper's rule")
    check_choice("model.encoder_shape", encoder_shape, SHAPES, "use paper (the paper's three layers) or shallow (two layers, no middle K*d layer)")
    check_choice("model.merged_positions", merged_positions, MERGED_POSITIONS,
                 "use compact (the paper: the merged sequence counted 0, 1, 2, ...) or spread (each merged embedding at "
                 "its block's last token's position in the uncompressed prompt)")
    if encoder_bound is not None and (not _number(encoder_bound) or encoder_bound <= 0):
        raise KTMError(f"model.encoder_bound must be a number > 0 or null, got {encoder_bound!r}",
                       "set it to 1.0 (correction at most the block mean's norm), or null for the paper's unbounded encoder")
    check_count("model.max_prompt_tokens", max_prompt_tokens, 1, "set it to e.g. 2048, or null for the base's context length",
                allow_none=True)
    if long_prompt_policy not in ("error", "truncate_left"):
        raise KTMError(f"unknown long_prompt_policy {long_prompt_policy!r}", "use 'error' or 'truncate_left'")
    if lora is not None:
        check_count("model.lora.r", lora.r, 0, "set it to e.g. 4 (0 disables LoRA)")
        if lora.r > 0:
            if not _number(lora.alpha) or lora.alpha <= 0:
                raise KTMError(f"model.lora.alpha must be a number > 0, got {lora.alpha!r}", "set it to e.g. 16")
            if not _number(lora.dropout) or not 0 <= lora.dropout < 1:
                raise KTMError(f"model.lora.dropout must be in [0, 1), got {lora.dropout!r}", "set it to e.g. 0.05")
            check_lora_targets(lora.target_modules)
    from ktm.compressors import check_name

    check_name(compressor)
    check_policy(merge_policy, segment_tokens, policy_score, ks, compressor)
    return ks


_TARGETS_FIX = (f"write [{ALL_LINEAR}, {LM_HEAD}] (every linear layer of the blocks + the LM head: the paper, the default), "
                f"[{ALL_LINEAR}] (peft's all-linear: without the head), or layer names such as [q_proj, v_proj]")


def check_lora_targets(targets) -> None:
    """The base-independent check of model.lora.target_modules: a non-empty list of names."""
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        raise KTMError(f"model.lora.target_modules is the string {targets!r}, ktm takes a list (so whether the LM head "
                       f"is adapted is spelled out)", _TARGETS_FIX)
    if isinstance(targets, (str, bytes)) or not isinstance(targets, Sequence) or not targets:
        raise KTMError(f"model.lora.target_modules must be a non-empty list, got {targets!r}", _TARGETS_FIX)
    bad = [t for t in targets if not isinstance(t, str) or not t.strip()]
    if bad:
        raise KTMError(f"model.lora.target_modules has {bad[0]!r}, not a layer name", _TARGETS_FIX)


def _lora_layer_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    return nn.Linear, Conv1D, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d  # the layer types peft's LoRA adapts


def resolve_lora_targets(base: nn.Module, targets: Sequence[str]) -> list[str]:
    """The layer names peft gets for model.lora.target_modules on this (bare, not yet peft-wrapped) base.

    `all-linear` means what it means in peft: every nn.Linear (and GPT-2's Conv1D) of the base except its
    output head, i.e. all projections of the transformer blocks. `lm_head` means the output head
    (`base.get_output_embeddings()`, `lm_head` in nearly every HF causal LM, whatever its name). Both expand to
    the shortest names that select exactly those layers under peft's rule (a name selects each module whose
    path is that name or ends in "." + it), in module order, so on a Llama-shaped base the default
    [all-linear, lm_head] gives exactly LLAMA_LORA_TARGETS, the explicit list of earlier versions. Any other
    entry is a layer name as peft takes it, kept as written once checked: it must select at least one layer
    LoRA can adapt and never the input embedding table (the merge encoder reads it, so it stays the base's).
    """
    check_lora_targets(targets)
    modules = [(name, mod) for name, mod in base.named_modules() if name]
    layer_types = _lora_layer_types()
    linear_types = layer_types[:2]
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    kind = getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__

    def selects(name: str) -> list[tuple[str, nn.Module]]:
        return [(path, mod) for path, mod in modules if path == name or path.endswith("." + name)]

    def shortest(wanted: list[str]) -> list[str]:
        keep, names = set(wanted), []
        for path in wanted:
            leaf = path.rsplit(".", 1)[-1]
            names.append(leaf if all(p in keep for p, _ in selects(leaf)) else path)
        return list(dict.fromkeys(names))

    resolved, unknown = [], []
    for entry in targets:
        if entry.lower() == ALL_LINEAR:
            wanted = [path for path, mod in modules if isinstance(mod, linear_types) and mod is not head]
            if not wanted:
                raise KTMError(f"model.lora.target_modules has {ALL_LINEAR}, but base {kind!r} has no linear layer besides its head",
                               "list the layers to adapt by name, or set model.lora.r=0 (no LoRA)")
            resolved += shortest(wanted)
            continue
        if entry == LM_HEAD and head is not None:
            resolved += shortest([path for path, mod in modules if mod is head])
            continue
        hits = selects(entry)
        if not hits:
            unknown.append(entry)
            continue
        for path, mod in hits:
            if embed is not None and mod is embed:
                raise KTMError(f"model.lora.target_modules has {entry!r}, the input embedding table ({path}): the merge encoder reads "
                               "it, so it stays the base's", "leave it out (the LM head, `lm_head`, may be adapted even when tied to it)")
            if not isinstance(mod, layer_types):
                raise KTMError(f"model.lora.target_modules has {entry!r}, which selects {path}, a {type(mod).__name__}: not a layer "
                               "LoRA can adapt", f"name its linear layers instead, e.g. {path}.<name>, or use [{ALL_LINEAR}, {LM_HEAD}]")
        resolved.append(entry)
    if unknown:
        have = list(dict.fromkeys(path.rsplit(".", 1)[-1] for path, mod in modules if isinstance(mod, linear_types)))
        which = "no layer of that name" if len(unknown) == 1 else "no layers of those names"
        raise KTMError(f"model.lora.target_modules has {', '.join(map(repr, unknown))}, but base {kind!r} has {which}",
                       f"use [{ALL_LINEAR}, {LM_HEAD}] (the default), or names of its linear layers: {', '.join(have)}")
    return list(dict.fromkeys(resolved))


def lora_target_paths(base: nn.Module, targets: Sequence[str]) -> set[str]:
    """The module paths of `base` that peft adapts for these targets (resolved as resolve_lora_targets)."""
    names = resolve_lora_targets(base, targets)
    return {path for path, _ in base.named_modules() if path and any(path == n or path.endswith("." + n) for n in names)}


def same_lora_targets(base_name: str, a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two spellings of model.lora.target_modules adapt the same layers of a base given by name, e.g. a
    checkpoint's [q_proj, ..., lm_head] and the default [all-linear, lm_head] on SmolLM2. Built from the base's
    config alone (ktm.base.base_skeleton, no weights). A spelling that does not fit the base raises its KTMError."""
    if list(a) == list(b):
        return True
    from ktm.base import base_skeleton

    skeleton = base_skeleton(base_name)
    return lora_target_paths(skeleton, a) == lora_target_paths(skeleton, b)


# check_settings' arguments by name: what from_base and the parsed-config check (ktm.training.lightning_cli) pass it
SETTINGS = ("ks", "keep_tail", "encoder_multiplier", "max_prompt_tokens", "long_prompt_policy", "lora", "encoder_bound", "compressor",
            "keep_marked", "merge_policy", "segment_tokens", "policy_score", "encoder_shape", "merged_positions")
MAX_ENCODER_PARAMS = 100_000_000  # an encoder may always be this big...
MAX_ENCODER_TO_BASE = 4  # ...or up to 4x the base model; beyond, a K is a typo that would exhaust memory


def _count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def check_drift_counts(**counts) -> None:
    """One line for a drift window or batch count that is not a whole number >= 1 (KTMModel.drift, ktm eval)."""
    for name, v in counts.items():
        check_count(name, v, 1, f"pass e.g. --{name.replace('_', '-')} 32")


def block_layout(n: int, k: int, keep_tail: int, kept: int = 0) -> tuple[int, int, int]:
    """(head, blocks, tail) for a prompt of n tokens whose last `kept` tokens are its kept span:
    head + blocks*k + tail == n, head < k, tail = min(keep_tail + kept, n)."""
    tail = min(keep_tail + kept, n)
    body = n - tail
    return body % k, body // k, tail


def last_positions(n: int, length: int, device=None) -> int | torch.Tensor:
    """transformers' `logits_to_keep=n` as the indices of the last n of `length` positions (0 stays 0: all).
    The int form slices the hidden states to a view whose batch stride is the full sequence's, and torch.matmul
    then cannot fold it into one matmul: it takes its batched path, which copies the whole transposed LM-head
    weight on every call (0.65 s of a 1.2 s prefill of 512 tokens for a 151,936-token vocabulary on 2 CPU cores,
    README Speed). Indexing copies the n positions instead, and the head is one plain matmul: the same logits."""
    if n <= 0:
        return 0
    return torch.arange(max(length - n, 0), length, device=device)


def teacher_positions(n: int, k: int, keep_tail: int = 0, kept: int = 0, targets: int = 0) -> list[int]:
    """For each position of a merged prompt of n tokens (then `targets` target tokens), the position of the
    uncompressed sequence it is matched with when distilling hidden states: a head or tail token with itself,
    a block with its last token (where the uncompressed model has read the whole block), a target with itself."""
    return runs_teacher_positions(fixed_runs(n, k, keep_tail, kept), targets)


def merged_length(n: int, k: int, keep_tail: int = 0, kept: int = 0) -> int:
    head, blocks, tail = block_layout(n, k, keep_tail, kept)
    return head + blocks + tail


def split_marked(prompt: str, keep: str) -> Prompt:
    """An example's prompt as a (text to merge, text to keep) pair when it marks a kept suffix `keep`;
    the prompt itself when it marks none."""
    if not keep:
        return prompt
    if not prompt.endswith(keep):
        raise KTMError(f"the kept span {keep[:40]!r} is not the end of its prompt {prompt[-40:]!r}",
                       "mark a suffix of the prompt (Example.keep)")
    return prompt[: len(prompt) - len(keep)], keep


class KTMModel(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        tokenizer,
        ks: Sequence[int] = (4,),
        keep_tail: int = 0,
        lora: LoraSettings | None = LoraSettings(),
        encoder_multiplier: float | None = None,
        base_name: str = "",
        base_fingerprint: str = "",
        max_prompt_tokens: int | None = None,
        long_prompt_policy: str = "error",
        encoder_bound: float | None = 1.0,
        compressor: str = "merge",
        keep_marked: bool = False,
        merge_policy: str = "fixed",
        segment_tokens: int = 16,
        policy_score: str = "surprisal",
        encoder_shape: str = "paper",
        merged_positions: str = "compact",
    ):
        super().__init__()
        ks = check_settings(ks, keep_tail, encoder_multiplier, max_prompt_tokens, long_prompt_policy, lora, encoder_bound, compressor,
                            keep_marked, merge_policy, segment_tokens, policy_score, encoder_shape, merged_positions)
        from ktm.compressors import get_compressor

        self.compressor = get_compressor(compressor)  # what build_batch feeds the LM (ktm.compressors); "merge" = the method
        self.tokenizer = tokenizer
        self.ks, self.keep_tail = ks, keep_tail
        self.keep_marked = keep_marked  # examples' marked spans (Example.keep) stay in tokens: example_prompts
        # How K is spread over a prompt (ktm.policy): "fixed" (the paper) or "budget" (a K per window of
        # segment_tokens by the windows' scores, at the step's K on average). Not part of the trained weights.
        self.merge_policy, self.segment_tokens = merge_policy, segment_tokens
        self.token_scores = TokenScores(policy_score)
        self.merged_positions = merged_positions  # MERGED_POSITIONS: where the base sees a merged embedding (build_batch)
        self.base_name, self.base_fingerprint = base_name, base_fingerprint
        self.lora_settings = lora if lora is not None and lora.r > 0 else None
        self.encoder_multiplier, self.encoder_bound, self.encoder_shape = encoder_multiplier, encoder_bound, encoder_shape
        self.context = getattr(base.config, "max_position_embeddings", None) or 1 << 30
        self.max_prompt_tokens = min(max_prompt_tokens or self.context, self.context)
        self.long_prompt_policy = long_prompt_policy
        self.truncated_prompts = 0  # counted, reported by the trainer: never silent
        for p in base.parameters():
            p.requires_grad_(False)
        self.embed = base.get_input_embeddings()  # the base's own frozen table
        d = self.embed.weight.shape[1]
        base_params = sum(p.numel() for p in base.parameters())
        for k in ks:
            n = encoder_parameters(k, d, encoder_multiplier, encoder_shape)
            if n > max(MAX_ENCODER_PARAMS, MAX_ENCODER_TO_BASE * base_params):
                raise KTMError(f"model.ks has K={k}: its merge encoder would have {_count(n)} parameters, more than "
                               f"{MAX_ENCODER_TO_BASE}x the base's {_count(base_params)}",
                               "use a smaller K (the paper uses K <= 4) or a smaller model.encoder_multiplier")
        if self.lora_settings is not None:
            from peft import LoraConfig, get_peft_model

            # The settings (and ktm.json) record the layer names the targets resolved to on this base.
            s = self.lora_settings = replace(self.lora_settings, target_modules=resolve_lora_targets(base, self.lora_settings.target_modules))
            cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules), bias="none")
            try:
                with warnings.catch_warnings():
                    # A LoRA on a tied head never touches the shared table: the base weights are frozen, an export
                    # stores no embeddings and merged_for_serving unties first. peft's caution does not apply.
                    warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.*", category=UserWarning)
                    # GPT-2's Conv1D stores its weight transposed; peft sets fan_in_fan_out per layer and says so.
                    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*", category=UserWarning)
                    self.lm = get_peft_model(base, cfg)
            except ValueError as exc:
                raise KTMError(f"LoRA target modules {list(s.target_modules)} do not fit this base ({str(exc)[:120]})",
                               "set model.lora.target_modules to layer names of the base model") from None
        else:
            self.lm = base
        param_dtype = torch.float32 if self.embed.weight.dtype == torch.float32 else self.embed.weight.dtype
        self.encoders = nn.ModuleDict({str(k): MergeEncoder(k, d, encoder_multiplier, encoder_bound, encoder_shape).to(param_dtype) for k in ks})
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_base(cls, base: str = "smollm2-135m", dtype: str = "float32", **kwargs) -> "KTMModel":
        from ktm.base import base_fingerprint, load_base

        check_settings(**{"ks": (4,), **{k: v for k, v in kwargs.items() if k in SETTINGS}})  # fail before loading weights
        model, tokenizer, resolved = load_base(base, dtype)
        return cls(model, tokenizer, base_name=base, base_fingerprint=base_fingerprint(resolved), **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.embed.weight.shape[1]

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            "encoder": [p for p in self.encoders.parameters() if p.requires_grad],
            "lora": [p for n, p in self.lm.named_parameters() if p.requires_grad and "lora_" in n],
        }

    # -- tokens ----------------------------------------------------------------------------------
    def _tokenize(self, prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[int]]:
        """(ids, kept) of each prompt, unchecked. A string is tokenized whole with the tokenizer's special
        tokens (its BOS); a pair (merge, keep) is its first text tokenized so, then its second without special
        tokens appended: those last tokens are its kept span. One tokenizer call per kind of text."""
        texts, keeps = [], []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                texts.append(p)
                continue
            if (not isinstance(p, (tuple, list)) or len(p) != 2 or not all(isinstance(t, str) for t in p)):
                raise KTMError(f"prompt #{i} is a {type(p).__name__}, not a string or a (text to merge, text to keep) pair",
                               "pass each prompt as a string, or as a pair of strings")
            texts.append(p[0])
            keeps.append(p[1])
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
        kept = [0] * len(ids)
        if keeps:
            spans = iter(self.tokenizer(keeps, add_special_tokens=False)["input_ids"])
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    span = next(spans)
                    ids[i], kept[i] = list(ids[i]) + list(span), len(span)
        return ids, kept

    def encode_prompts(self, prompts: Sequence[Prompt]) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prompt and how many of its last tokens are its kept span (0 for a string).

        The one place prompts become ids: training, evaluation, generate, classify and merge all read prompts
        through it, so a model serves prompts tokenized exactly as it was trained on. A string is all merged;
        a pair (text to merge, text to keep) keeps its second text in tokens (see `_tokenize`). Empty prompts
        are refused and long ones checked (`model.long_prompt_policy`; truncate_left cuts from the left, so
        the kept span survives unless it is longer than the limit itself)."""
        ids, kept = self._tokenize(prompts)
        out = []
        for i, row in enumerate(ids):
            if not row:
                raise KTMError(f"prompt #{i} is empty", "give every example a non-empty prompt")
            if len(row) > self.max_prompt_tokens:
                if self.long_prompt_policy == "error":
                    raise KTMError(
                        f"prompt #{i} has {len(row)} tokens, more than the limit of {self.max_prompt_tokens}",
                        "shorten it, or set model.long_prompt_policy=truncate_left (counted in the metrics)",
                    )
                row = row[-self.max_prompt_tokens:]
                kept[i] = min(kept[i], len(row))
                self.truncated_prompts += 1
            out.append(row)
        return out, kept

    def tokenize_prompts(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of string prompts (all merged). Pairs need their kept counts too: use encode_prompts."""
        if any(not isinstance(p, str) for p in prompts):
            raise KTMError("tokenize_prompts takes string prompts only", "use encode_prompts, which also returns each pair's kept count")
        return self.encode_prompts(prompts)[0]

    def example_prompts(self, prompts: Sequence[str], keeps: Sequence[str] | None = None) -> list[Prompt]:
        """Benchmark examples' prompts as this model reads them: with keep_marked, each one whose example
        marks a kept suffix (Example.keep) becomes the pair (the rest, that suffix); otherwise the prompts
        as they are (the paper: everything merged)."""
        if not self.keep_marked or keeps is None:
            return list(prompts)
        return [split_marked(p, keep) for p, keep in zip(prompts, keeps, strict=True)]

    def check_prompt_lengths(self, prompts: Sequence[Prompt], what: str = "prompts") -> None:
        """Fail before any training when prompts exceed max_prompt_tokens under policy "error", naming how
        many and the longest, instead of stopping on the first such batch mid-run."""
        if self.long_prompt_policy != "error" or not prompts:
            return
        # Only prompts that could be too long get tokenized (text_size bounds the token count; margin for
        # BOS and special tokens), so a run over 100k long tree prompts does not spend minutes here.
        suspects = [p for p in prompts if text_size(p if isinstance(p, str) else "".join(p)) + 8 > self.max_prompt_tokens]
        lengths = [len(row) for row in self._tokenize(suspects)[0]] if suspects else []
        over = [n for n in lengths if n > self.max_prompt_tokens]
        if over:
            raise KTMError(
                f"{len(over)} of {len(prompts)} {what} are longer than the limit of {self.max_prompt_tokens} tokens (longest {max(over)})",
                "raise model.max_prompt_tokens, set model.long_prompt_policy=truncate_left (counted), or cap the data "
                "(e.g. data.benchmark_args.max_old_chars for commitpack)")

    def tokenize_targets(self, targets: Sequence[str], add_eos: bool = True) -> list[list[int]]:
        ids = self.tokenizer(list(targets), add_special_tokens=False)["input_ids"]
        return [row + [self.eos_id] if add_eos else row for row in ids]

    def label_token_ids(self, labels: Sequence[str]) -> list[int]:
        """First token of each label; classification compares their logits at the answer position."""
        first = [ids[0] for ids in self.tokenize_targets(labels, add_eos=False)]
        if len(set(first)) != len(first):
            raise KTMError(f"labels {list(labels)} start with the same token", "choose label words that differ in their first token")
        return first

    # -- the merge -------------------------------------------------------------------------------
    def _encoder(self, k: int) -> MergeEncoder:
        if str(k) not in self.encoders:
            raise KTMError(f"this model has no encoder for K={k} (it has K in {self.ks})", f"use one of K={self.ks} or train with K={k}")
        return self.encoders[str(k)]

    def embed_rows(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, longest, d) token embeddings of id rows, right-padded with the pad id: one lookup for all rows."""
        padded = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            padded[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        return self.embed(padded.to(self.embed.weight.device))

    def _blocks(self, prompt_ids: Sequence[Sequence[int]], k: int, kept: Sequence[int] | None = None):
        """Token embeddings (B, n_max, d), each prompt's (head, blocks, tail) layout, and all K-blocks of
        the batch stacked (sum m_i, K, d), so the encoder runs once per batch. `kept[i]`: the last tokens of
        prompt i that are its kept span (they join the tail; None = none)."""
        lengths = [len(p) for p in prompt_ids]
        emb = self.embed_rows(prompt_ids)  # one lookup for the whole batch
        kept = _check_kept(kept, lengths)
        layouts = [block_layout(n, k, self.keep_tail, kept[i] if kept else 0) for i, n in enumerate(lengths)]
        bodies = [emb[i, h : h + m * k].reshape(m, k, emb.shape[-1]) for i, (h, m, _) in enumerate(layouts)]
        blocks = bodies[0] if len(bodies) == 1 else torch.cat(bodies)  # one prompt: a view, no copy
        return emb, layouts, blocks

    @torch.no_grad()
    def correction_ratio(self, prompt_ids: Sequence[Sequence[int]], k: int, kept: Sequence[int] | None = None) -> float:
        """How far the K merge encoder has moved from the plain mean on these prompts: mean norm of its
        learned correction over mean norm of the block means (0 at init, 0 for K=1).

        A healthy encoder stays around 1 or below. Far above (tens, hundreds) the correction swamps the
        token information and merged training stalls at chance: the encoder's learning rate is too high.
        """
        if k == 1:
            return 0.0
        _, _, blocks = self._blocks(prompt_ids, k, kept)
        mean, correction = self._encoder(k).parts(blocks)
        return float(correction.norm(dim=-1).mean() / mean.norm(dim=-1).mean().clamp(min=1e-12))

    def layouts(self, prompt_ids: Sequence[Sequence[int]], k: int, kept: Sequence[int] | None = None,
                policy: str | None = None) -> list[list[tuple[int, int]]]:
        """Each prompt's layout as runs (tokens, K) under `policy` (None: the model's merge_policy), ktm.policy.
        Under "budget" at K > 1 each window's K comes from its tokens' scores (one cached base pass per prompt)."""
        policy = self.merge_policy if policy is None else policy
        check_policy(policy, self.segment_tokens, self.token_scores.score, self.ks, self.compressor.name)
        kept = _check_kept(kept, [len(p) for p in prompt_ids]) or [0] * len(prompt_ids)
        if policy == "fixed" or k == 1:
            return [fixed_runs(len(p), k, self.keep_tail, c) for p, c in zip(prompt_ids, kept)]
        out = []
        for p, c in zip(prompt_ids, kept):
            body = len(p) - min(self.keep_tail + c, len(p))
            out.append(budget_runs(len(p), k, self.ks, self.segment_tokens, self.token_scores(self, p[:body]), self.keep_tail, c))
        return out

    def _merge_runs(self, prompt_ids: Sequence[Sequence[int]], runs: Sequence[Sequence[tuple[int, int]]]) -> list[tuple[torch.Tensor, ...]]:
        """Each prompt's pieces for a layout of runs: tokens as their embeddings, blocks through their K's
        encoder, every K's blocks of the whole batch in one encoder call (a block sees only its own tokens,
        so an example gets the same pieces alone or in any batch)."""
        emb = self.embed_rows(prompt_ids)
        d = emb.shape[-1]
        by_k: dict[int, list[torch.Tensor]] = {}
        for i, layout in enumerate(runs):
            p = 0
            for t, k in layout:
                if k > 1:
                    by_k.setdefault(k, []).append(emb[i, p : p + t].reshape(t // k, k, d))
                p += t
        merged = {k: iter(self._encoder(k)(torch.cat(parts)).to(emb.dtype).split([x.shape[0] for x in parts]))
                  for k, parts in by_k.items()}
        pieces = []
        for i, layout in enumerate(runs):
            p, mine = 0, []
            for t, k in layout:
                mine.append(emb[i, p : p + t] if k == 1 else next(merged[k]))
                p += t
            pieces.append(tuple(mine))
        return pieces

    def build_batch(self, prompt_ids: Sequence[Sequence[int]], k: int, target_ids: Sequence[Sequence[int]] | None = None,
                    unscored: Sequence[int] | None = None, kept: Sequence[int] | None = None, policy: str | None = None) -> Batch:
        """The merged, left-padded batch. `unscored[i]` leading target tokens of example i are read but not
        scored (a cue such as the reading stage's "Repeat the text above:"). `kept[i]` last prompt tokens of
        example i are its kept span (encode_prompts): they stay tokens, with every compressor (None = none).
        `policy`: how K spreads over each prompt, "fixed" or "budget" (None: the model's merge_policy)."""
        device = self.embed.weight.device
        lengths = [len(p) for p in prompt_ids]
        kept = _check_kept(kept, lengths)
        policy = self.merge_policy if policy is None else policy
        adapted, runs = None, None
        if self.compressor.name == "merge" and policy == "budget" and k > 1:
            runs = self.layouts(prompt_ids, k, kept, policy)
            prompts = self._merge_runs(prompt_ids, runs)
            fixed = self.layouts(prompt_ids, k, kept, "fixed")
            adapted = torch.tensor([moved_tokens(r, f) for r, f in zip(runs, fixed)])
        elif self.compressor.name == "merge":
            encoder = self._encoder(k)
            emb, layouts, blocks = self._blocks(prompt_ids, k, kept)
            merged = encoder(blocks).to(emb.dtype).split([m for _, m, _ in layouts])
            prompts = [(emb[i, :h], merged[i], emb[i, n - t : n]) for i, (n, (h, m, t)) in enumerate(zip(lengths, layouts))]
            runs = [layout_runs(h, m, t, k) for h, m, t in layouts]
        else:  # a baseline (ktm.compressors): one (L_i, d) piece per prompt, padded and masked as below
            prompts = [(e,) for e in self.compressor.embeddings(self, prompt_ids, k, kept)]
        p_lens = [sum(piece.shape[0] for piece in pieces) for pieces in prompts]
        target_emb = None
        if target_ids is not None:
            target_emb = self.embed_rows(target_ids)
        B, d = len(prompt_ids), self.hidden_size
        t_lens = [len(t) for t in target_ids] if target_ids is not None else [0] * B
        seq_lens = [pl + tl for pl, tl in zip(p_lens, t_lens)]
        seq_len = max(seq_lens)
        # Each piece is written straight into its example's left-padded slot: no per-example concatenation
        # and no zero-fill of positions that are overwritten anyway (each is a full copy of the prompt).
        inputs = prompts[0][0].new_empty(B, seq_len, d)
        for i, tl in enumerate(t_lens):
            pos = seq_len - seq_lens[i]
            if pos:
                inputs[i, :pos] = 0
            pieces = prompts[i] + ((target_emb[i, :tl],) if target_emb is not None else ())
            for piece in pieces:
                if piece.shape[0] or piece.requires_grad:  # an empty merged piece still links the encoder to the loss
                    inputs[i, pos : pos + piece.shape[0]] = piece
                    pos += piece.shape[0]
        starts = torch.tensor([seq_len - s for s in seq_lens], device=device)
        mask = (torch.arange(seq_len, device=device) >= starts[:, None]).long()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.merged_positions == "spread" and runs is not None and k > 1:  # a baseline's tokens stay compact
            for i, layout in enumerate(runs):
                positions[i, seq_len - seq_lens[i] :] = torch.tensor(runs_teacher_positions(layout, t_lens[i]), device=device)
        targets = None
        if target_ids is not None:
            t_max = max(len(t) for t in target_ids)
            targets = torch.full((B, t_max), -100, dtype=torch.long, device=device)
            for i, t in enumerate(target_ids):
                skip = unscored[i] if unscored is not None else 0
                targets[i, t_max - len(t) + skip :] = torch.as_tensor(t[skip:], dtype=torch.long, device=device)
        return Batch(
            inputs_embeds=inputs,
            attention_mask=mask,
            position_ids=positions,
            targets=targets,
            prompt_tokens=torch.tensor(lengths),
            merged_tokens=torch.tensor(p_lens),
            adapted_tokens=adapted,
        )

    # -- forward passes --------------------------------------------------------------------------
    def forward(self, batch: Batch, logits_to_keep: int = 0, **kwargs):
        """The LM on the batch; logits_to_keep=n > 0: the LM head on the last n positions only (0: all)."""
        return self.lm(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            logits_to_keep=last_positions(logits_to_keep, batch.inputs_embeds.shape[1], batch.inputs_embeds.device),
            **kwargs,
        )

    def target_nll(self, batch: Batch, pred: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example summed NLL and token count on target tokens, plus the answer-position logits
        (`pred`: the batch's target_logits when the caller already has them).

        Only the last T+1 positions go through the LM head (logits_to_keep): the prompt never needs
        vocabulary logits, which saves most of the head's compute and memory on long prompts.
        """
        pred = self.target_logits(batch) if pred is None else pred
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), batch.targets.reshape(-1), ignore_index=-100, reduction="none")
        nll = nll.view(batch.targets.shape)
        counts = (batch.targets != -100).sum(-1)
        first = (batch.targets != -100).float().argmax(-1)  # first target position = the answer position
        answer_logits = pred[torch.arange(pred.shape[0]), first]
        return nll.sum(-1), counts, answer_logits

    def target_logits(self, batch: Batch) -> torch.Tensor:
        """(B, T, V) float logits predicting each target position (only those go through the LM head)."""
        return self.target_outputs(batch)[0]

    def target_outputs(self, batch: Batch, hidden: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """target_logits, plus every layer's hidden state (the embeddings layer left out): hidden="targets" at
        the positions that predict the targets, (layers, B, T, d), where the model decides each target token;
        "all" at every position, (layers, B, L, d)."""
        assert batch.targets is not None
        T = batch.targets.shape[1]
        out = self.forward(batch, logits_to_keep=T + 1, use_cache=False, output_hidden_states=hidden is not None)
        states = None
        if hidden == "targets":
            states = torch.stack([h[:, -(T + 1) : -1] for h in out.hidden_states[1:]])
        elif hidden == "all":
            states = torch.stack(out.hidden_states[1:])
        elif hidden is not None:
            raise ValueError(f"hidden must be None, 'targets' or 'all', got {hidden!r}")
        return out.logits[:, :-1].float(), states

    def aligned_positions(self, prompt_ids: Sequence[Sequence[int]], k: int, target_lengths: Sequence[int],
                          kept: Sequence[int] | None, merged_len: int, full_len: int,
                          policy: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B index, position) pairs of every real position of a merged batch (length merged_len) and of the
        position of the uncompressed batch of the same examples (length full_len, K=1) it is matched with
        (teacher_positions); both left-padded as build_batch lays them out. Two (N, 2) long tensors.

        Each sequence's first position is left out: it is the attention sink of both models (on SmolLM2 its
        residual stream is ~100x the others'), so a first *block* would otherwise be pulled towards the
        uncompressed model's fourth token and lose its sink (measured: a relative gap of ~8000 there against
        ~0.6 at every other position)."""
        runs = self.layouts(prompt_ids, k, kept, policy)
        student, teacher = [], []
        for i, (p, tl) in enumerate(zip(prompt_ids, target_lengths)):
            n = len(p)
            mine = runs_teacher_positions(runs[i], tl)
            s0, t0 = merged_len - len(mine), full_len - (n + tl)
            student += [(i, s0 + j) for j in range(1, len(mine))]
            teacher += [(i, t0 + j) for j in mine[1:]]
        return torch.tensor(student, dtype=torch.long), torch.tensor(teacher, dtype=torch.long)

    @torch.no_grad()
    def teacher_outputs(self, prompt_ids: Sequence[Sequence[int]], target_ids: Sequence[Sequence[int]],
                        unscored: Sequence[int] | None = None, kept: Sequence[int] | None = None,
                        teacher: str = "base", hidden: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """target_outputs of a teacher reading the *uncompressed* prompt, at the same target positions as a
        merged batch of the same examples. teacher="base": the frozen base (adapters disabled, so no second
        model in memory); "k1": this model itself at K=1, adapters on (after task training it knows the task,
        which the bare base does not). Without gradients either way."""
        if teacher not in DISTILL_TEACHERS:
            raise KTMError(f"unknown distillation teacher {teacher!r}", f"use one of: {', '.join(DISTILL_TEACHERS)}")
        batch = self.build_batch(prompt_ids, 1, target_ids, unscored, kept)
        with self.bare_base() if teacher == "base" else nullcontext():
            return self.target_outputs(batch, hidden)

    def use_attention(self, implementation: str) -> None:
        """Switch the LM's attention kernel ("sdpa", "eager", "eager_float32" or "blocked_causal" from ktm/attention.py, or any name
        transformers knows) in place; the weights are the same and the results equal up to float rounding
        (model.attention: on 2 CPU cores SDPA's backward cost ~9 ms per layer call on the tree's short merged
        prompts, the eager kernels about a third of it; README Speed)."""
        from ktm.attention import KERNELS, register

        if implementation in KERNELS:
            register(implementation)
        if self.attention != implementation:
            with warnings.catch_warnings():  # transformers 5 calls its own deprecated is_gradient_checkpointing here
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self._lm_model().set_attn_implementation(implementation)

    def store_frozen_linears(self, dtype: torch.dtype) -> int:
        """Keep every frozen nn.Linear weight (and bias) of the LM in `dtype`; returns how many layers changed.

        For training under autocast in `dtype`: autocast casts a float32 weight to `dtype` at every use and
        caches no cast of a frozen tensor, so each step recast the whole base (a SmolLM2 step on 16 x 160 tokens:
        9.32 s -> 7.96 s on 2 CPU cores; no measurable change on the tree's short K=4 prompts, README Speed).
        Cast once, the matmuls see the same values and give bit-identical losses and gradients (tested). A head
        tied to the input embeddings gets its own copy: the table stays float32, for the encoders and for
        autocast's float32 embedding lookup. Trainable weights (LoRA, encoders) are untouched."""
        table = self.embed.weight
        changed = 0
        for module in self.lm.modules():
            if not isinstance(module, nn.Linear) or module.weight.requires_grad or module.weight.dtype == dtype:
                continue
            if module.weight is table:  # tied head: untie rather than cast the shared table
                module.weight = nn.Parameter(table.detach().to(dtype), requires_grad=False)
            else:
                module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            changed += 1
        return changed

    @property
    def frozen_linear_dtype(self) -> torch.dtype | None:
        """The dtype the frozen base's linear weights are kept in (store_frozen_linears), None without any."""
        return next((m.weight.dtype for m in self.lm.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad), None)

    @property
    def attention(self) -> str:
        """The LM's attention kernel now ("sdpa", "eager", ...)."""
        return self._lm_model().config._attn_implementation

    def _lm_model(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def bare_base(self):
        """Context in which self.lm is the frozen base alone: peft's disable_adapter(), or nothing to do
        when there is no LoRA (or it was merged away)."""
        return self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else nullcontext()

    @torch.no_grad()
    def classify(self, prompts: Sequence[Prompt], labels: Sequence[str], k: int) -> torch.Tensor:
        """Index of the most likely label per prompt (one prefill, only the last position's logits). A prompt
        is a string or a (text to merge, text to keep) pair (encode_prompts)."""
        label_ids = self.label_token_ids(labels)
        ids, kept = self.encode_prompts(prompts)
        batch = self.build_batch(ids, k, kept=kept)
        logits = self.forward(batch, logits_to_keep=1, use_cache=False).logits[:, -1]
        return logits[:, label_ids].argmax(-1)

    # Generation in its two public steps, so a benchmark or a server runs exactly generate_ids' calls.
    @torch.no_grad()
    def prefill(self, batch: Batch):
        """The one forward pass over the (merged) prompt: KV cache kept, LM head on the last position only
        (the first new token needs nothing else). Returns the transformers output (.logits (B, 1, V),
        .past_key_values)."""
        return self.forward(batch, logits_to_keep=1, use_cache=True)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, past_key_values):
        """Feed one new token per row (tokens: (B,)) on the KV cache of the sequence so far, whose mask is
        attention_mask (B, L) and whose last position is position_ids[:, -1:]. Returns (output, mask,
        positions) grown by that token: pass them to the next step. The cache is extended in place."""
        mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        pos = position_ids[:, -1:] + 1  # real positions only: left padding does not count
        out = self.lm(input_ids=tokens[:, None], attention_mask=mask, position_ids=pos, past_key_values=past_key_values,
                      use_cache=True, logits_to_keep=1)
        return out, mask, pos

    @staticmethod
    def pick(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Next token per row from (B, V) logits: argmax at temperature 0, else top-p sampling."""
        return _pick(logits, temperature, top_p, generator)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        k: int | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """Answer each prompt: a string (all merged) or a (text to merge, text to keep) pair (encode_prompts)."""
        ids, kept = self.encode_prompts(prompts)
        ids = self.generate_ids(ids, k, max_new_tokens, temperature, top_p, seed, kept=kept)
        return [self.tokenizer.decode([t for t in row if t != self.eos_id], skip_special_tokens=True) for row in ids]

    @torch.no_grad()
    def generate_ids(self, prompt_ids, k=None, max_new_tokens=32, temperature=0.0, top_p=1.0, seed=None, kept=None) -> list[list[int]]:
        """Prefill once on the merged prompt, then decode token by token reusing the KV cache. `kept[i]`: the
        last prompt tokens of row i that stay tokens (build_batch)."""
        k = self.ks[-1] if k is None else check_k(k)
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        batch = self.build_batch(prompt_ids, k, kept=kept)
        out = self.prefill(batch)
        mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
        done = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        tokens = []
        for step in range(max_new_tokens):
            nxt = self.pick(out.logits[:, -1], temperature, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            tokens.append(nxt)
            done |= nxt == self.eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            out, mask, pos = self.decode_step(nxt, mask, pos, out.past_key_values)
        rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in prompt_ids]
        result = []
        for row in rows:  # cut each row after its first EOS
            result.append(row[: row.index(self.eos_id) + 1] if self.eos_id in row else row)
        return result

    @torch.no_grad()
    def merge(self, prompts: Sequence[Prompt], k: int | None = None) -> dict:
        """Merged prompt embeddings for a serving engine that takes prompt embeddings (e.g. vLLM with
        `enable_prompt_embeds`): one (L_i, d) tensor per prompt (no padding), plus the LoRA adapter the
        engine must load with them. A prompt is a string or a (text to merge, text to keep) pair."""
        k = self.ks[-1] if k is None else check_k(k)
        ids, kept = self.encode_prompts(prompts)
        batch = self.build_batch(ids, k, kept=kept)
        embeds = [batch.inputs_embeds[i, batch.attention_mask[i].bool()].cpu() for i in range(len(prompts))]
        return {"k": k, "prompt_embeds": embeds, "prompt_tokens": batch.prompt_tokens.tolist(),
                "merged_tokens": batch.merged_tokens.tolist(), "kept_tokens": kept, "adapter": getattr(self, "adapter_path", None)}

    lora_merged = False  # True on the copies merged_for_serving makes

    def merged_for_serving(self) -> "KTMModel":
        """A copy whose LoRA is folded into the base weights (peft merge_and_unload): the same outputs
        without the adapter's extra matmuls in every layer (unmerged LoRA cost ~25% of the K=1 prefill on
        CPU, README "Speed"), and a plain transformers model for engines that take no LoRA.

        A tied LM head is untied first: merging adds the head's LoRA delta into its weight, and when tied
        that weight *is* the input embedding table, which the merge encoder and decoding read; it must stay
        the base's. The copy cannot be saved as a ktm checkpoint (that stores the adapter): save this model."""
        import copy

        clone = copy.deepcopy(self, memo={id(self.tokenizer): self.tokenizer})  # the tokenizer is shared, not copied
        if clone.lora_settings is None:
            return clone.eval()
        _untie_output_embeddings(clone.lm.get_base_model(), clone.embed)
        clone.lm = clone.lm.merge_and_unload()
        if clone.lm.get_input_embeddings() is not clone.embed or not torch.equal(clone.embed.weight, self.embed.weight):
            raise AssertionError("merging the LoRA changed the input embedding table")  # not `assert`: survives -O
        clone.lora_settings, clone.adapter_path, clone.lora_merged = None, None, True
        return clone.eval()

    # -- save / load -----------------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "ks": self.ks,
            "keep_tail": self.keep_tail,
            "base": self.base_name,
            "base_fingerprint": self.base_fingerprint,
            "hidden_size": self.hidden_size,
            "encoder_multiplier": self.encoder_multiplier,
            "encoder_bound": self.encoder_bound,
            "encoder_shape": self.encoder_shape,
            "lora": asdict(self.lora_settings) if self.lora_settings else None,
            "max_prompt_tokens": self.max_prompt_tokens,
            "long_prompt_policy": self.long_prompt_policy,
            "compressor": self.compressor.name,
            "keep_marked": self.keep_marked,
            "merge_policy": self.merge_policy,
            "segment_tokens": self.segment_tokens,
            "policy_score": self.token_scores.score,
            "merged_positions": self.merged_positions,
        }

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write encoder (safetensors), adapter (peft HF format) and ktm.json into a fresh folder, each
        file with its sha256 recorded, then swap that folder in whole (ktm.io.atomic_dir): a crash,
        Ctrl-C or full disk never leaves a half-written file or a mix of two saves."""
        from safetensors.torch import save as safetensors_bytes

        if self.lora_merged:  # its adapter is inside the base weights now: a checkpoint would silently lose it
            raise KTMError("this model's LoRA is merged into its base weights (merged_for_serving): a ktm checkpoint "
                           "stores the adapter, not merged weights", "save the unmerged model it was made from")
        with atomic_dir(directory) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.encoders.state_dict().items()}
            if state:
                write_bytes(tmp / "encoder.safetensors", safetensors_bytes(state))
            if self.lora_settings is not None:
                adapter = tmp / "adapter"
                self.lm.save_pretrained(adapter, save_embedding_layers=False)  # the base (tied head incl.) is frozen
                for f in sorted(adapter.iterdir()):
                    write_text(Path(str(f) + SIDECAR), f"{sha256_file(f)}  {f.name}\n", checksum=False)
            write_json(tmp / "ktm.json", {**self.metadata(), **(extra or {})})
        return Path(directory)

    # The encoders and peft's LoRA draw fresh weights before the saved ones replace them: loading must not move the
    # caller's seeded stream (a run that loads a teacher draws what the same seed draws without one).
    @classmethod
    @torch.random.fork_rng(devices=[])
    def from_pretrained(cls, directory: str | os.PathLike, base: str | None = None, dtype: str = "float32") -> "KTMModel":
        """Load an exported run folder (ktm.json + encoder.safetensors + adapter/). Refuses missing,
        truncated or mismatched files with one clear line."""
        from safetensors.torch import load_file

        from ktm.base import base_fingerprint, load_base

        directory = Path(directory)
        if not directory.is_dir():
            previous = interrupted_save(directory)
            if previous is not None:
                raise KTMError(f"checkpoint folder {directory} is missing: a save was interrupted and left the previous export in {previous}",
                               f"rename it back (mv {previous} {directory}) or re-export the run")
            raise KTMError(f"checkpoint folder {directory} does not exist", "pass the export folder of a run (checkpoints/<exp>/<run>/export)")
        meta = read_json(directory / "ktm.json", "checkpoint metadata")
        if meta.get("format_version") != FORMAT_VERSION:
            raise KTMError(f"checkpoint {directory} has format {meta.get('format_version')}, this ktm reads {FORMAT_VERSION}",
                           "re-export it with this version of ktm")
        missing = [k for k in ("ks", "keep_tail", "base") if k not in meta]
        if missing:
            raise KTMError(f"checkpoint metadata {directory / 'ktm.json'} lacks {', '.join(missing)}", "re-export the run with ktm")
        # Every file is checked before the (possibly large) base is loaded.
        lora = meta.get("lora")
        if lora is not None:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                verify(directory / "adapter" / name, "LoRA adapter file")
        if any(k > 1 for k in meta["ks"] if isinstance(k, int)):
            verify(directory / "encoder.safetensors", "merge encoder weights")
        base_name = base or meta["base"]
        model, tokenizer, resolved = load_base(base_name, dtype)
        fp = base_fingerprint(resolved)
        if meta.get("base_fingerprint") and fp != meta["base_fingerprint"]:
            raise KTMError(
                f"checkpoint {directory} was trained on base {meta['base']!r} (weights {meta['base_fingerprint'][:12]}...), "
                f"but {base_name!r} has weights {fp[:12]}...",
                f"load it with the base it was trained on ({meta['base']})",
            )
        meta = with_unrecorded(meta)
        self = cls(model, tokenizer, ks=meta["ks"], keep_tail=meta["keep_tail"], lora=None,
                   encoder_multiplier=meta.get("encoder_multiplier"), encoder_bound=meta["encoder_bound"], base_name=meta["base"], base_fingerprint=fp,
                   max_prompt_tokens=meta.get("max_prompt_tokens"), long_prompt_policy=meta["long_prompt_policy"],
                   compressor=meta["compressor"], keep_marked=meta["keep_marked"], merge_policy=meta["merge_policy"],
                   segment_tokens=meta["segment_tokens"], policy_score=meta["policy_score"], encoder_shape=meta["encoder_shape"],
                   merged_positions=meta["merged_positions"])
        if lora is not None:
            from peft import PeftModel

            adapter = directory / "adapter"
            self.lm = PeftModel.from_pretrained(model, str(adapter))
            self.lora_settings = LoraSettings(**lora)
            self.adapter_path = str(adapter)
        if any(k > 1 for k in self.ks):
            path = directory / "encoder.safetensors"
            try:
                state = load_file(str(path))
            except Exception as exc:  # safetensors raises its own error types for damaged headers
                raise KTMError(f"merge encoder weights {path} cannot be read ({exc})", "re-export the run") from None
            try:
                self.encoders.load_state_dict(state)
            except RuntimeError as exc:
                raise KTMError(f"merge encoder weights {path} do not fit K={self.ks} / hidden size {self.hidden_size} "
                               f"({str(exc).splitlines()[0][:100]})", "check ktm.json matches the weights, or re-export") from None
        self.eval()
        return self

    # -- drift on a user's own texts (ktm eval) ----------------------------------------------------
    @torch.no_grad()
    def drift(self, texts: Sequence[str], ks: Sequence[int] | None = None, prefix_tokens: int = 128,
              continuation_tokens: int = 32, batch_size: int = 8, max_texts: int | None = None,
              progress: Callable[[int, int], None] | None = None, policies: Sequence[str] | None = None) -> dict:
        """Perplexity of a continuation after the merged prefix vs after the uncompressed prefix, per K:
        drift = ppl_merged / ppl_uncompressed - 1 (0: merging costs nothing on these texts).

        Each text gives one window: its first `prefix_tokens` tokens are the prompt (after the BOS the
        tokenizer adds, if any, as tokenize_prompts does), the next `continuation_tokens` the scored target.
        Shorter texts are skipped and counted; `max_texts` caps how many are scored. The uncompressed side
        is this model at K=1, the LoRA reading the plain prefix. Perplexities are token-weighted over all
        windows. `ks` defaults to every K > 1 of the model. `policies` (ktm.policy; default the model's
        merge_policy) each give a row per K: "fixed" for the K this checkpoint has, "budget" for any K (the
        average ratio; its windows use the checkpoint's K). `progress(n, total)` is called after each batch
        of n texts. Returns the summary, one row per (policy, K) in "per_k", and each window's summed NLL
        per side in "nll_per_text" (sides "uncompressed", "<K>" for fixed, "<K>:budget")."""
        policies = _drift_policies(self, policies)
        ks = _drift_ks(self, ks, policies)
        cells = [(policy, k) for policy in policies for k in ks if policy == "budget" or k in self.ks]
        check_drift_counts(prefix_tokens=prefix_tokens, continuation_tokens=continuation_tokens, batch_size=batch_size,
                           max_texts=1 if max_texts is None else max_texts)
        lead = _leading_special_ids(self.tokenizer)
        n_prompt = len(lead) + prefix_tokens
        if n_prompt > self.max_prompt_tokens or n_prompt + continuation_tokens > self.context:
            raise KTMError(f"a window of {n_prompt} prompt + {continuation_tokens} continuation tokens does not fit this model "
                           f"(prompt limit {self.max_prompt_tokens}, context {self.context})", "lower --prefix-tokens / --continuation-tokens")
        if not texts:
            raise KTMError("no texts to score", "give at least one text")
        prompts, targets, skipped = drift_windows(self.tokenizer, texts, prefix_tokens, continuation_tokens, max_texts, lead)
        if not prompts:
            raise KTMError(f"none of the {skipped} texts has {prefix_tokens} + {continuation_tokens} tokens to score",
                           "give longer texts, or lower --prefix-tokens / --continuation-tokens")
        from ktm.compressors import get_compressor

        side = {cell: str(cell[1]) if cell[0] == "fixed" else f"{cell[1]}:{cell[0]}" for cell in cells}
        nll: dict[str, list[float]] = {name: [] for name in ("uncompressed", *side.values())}
        positions = {cell: 0 for cell in cells}
        was_training, kept, plain = self.training, self.compressor, get_compressor("none")
        self.eval()  # LoRA dropout off: the same texts must give the same drift
        try:
            for start in range(0, len(prompts), batch_size):
                p, t = prompts[start : start + batch_size], targets[start : start + batch_size]
                # The `none` compressor feeds the prefix as it is: the K=1 reading, also of a checkpoint
                # trained without K=1 (whose K=1 encoder would be the identity anyway).
                self.compressor = plain
                nll["uncompressed"] += self.target_nll(self.build_batch(p, 1, t))[0].tolist()
                self.compressor = kept
                for cell in cells:
                    b = self.build_batch(p, cell[1], t, policy=cell[0])
                    nll[side[cell]] += self.target_nll(b)[0].tolist()
                    positions[cell] += int(b.merged_tokens.sum())
                if progress is not None:
                    progress(len(p), len(prompts))
        finally:
            self.compressor = kept
            self.train(was_training)
        tokens = len(prompts) * continuation_tokens
        ppl = {name: math.exp(min(math.fsum(v) / tokens, 700.0)) for name, v in nll.items()}  # fsum: any batching, same sum
        rows = [{"k": k, "policy": policy, "texts": len(prompts), "tokens": tokens,
                 "prefix_positions": positions[(policy, k)] / len(prompts),  # the mean: a budget layout's varies
                 "ppl_uncompressed": ppl["uncompressed"], "ppl_merged": ppl[side[policy, k]],
                 "drift": ppl[side[policy, k]] / ppl["uncompressed"] - 1}
                for policy, k in cells]
        return {"texts": len(prompts), "skipped": skipped, "tokens": tokens, "prefix_tokens": prefix_tokens,
                "continuation_tokens": continuation_tokens, "compressor": kept.name, "merged_positions": self.merged_positions,
                "ppl_uncompressed": ppl["uncompressed"],
                "per_k": rows, "nll_per_text": nll}


def _check_kept(kept: Sequence[int] | None, lengths: Sequence[int]) -> list[int] | None:
    """Per-example kept counts as a list, or None when there are none (all zero: exactly the unmarked path)."""
    if kept is None:
        return None
    kept = [int(c) for c in kept]
    if len(kept) != len(lengths):
        raise KTMError(f"{len(kept)} kept counts for {len(lengths)} prompts", "give one kept count per prompt (encode_prompts)")
    for i, (c, n) in enumerate(zip(kept, lengths)):
        if not 0 <= c <= n:
            raise KTMError(f"prompt #{i} has {n} tokens, so it cannot keep {c} of them", "use the kept counts encode_prompts returns")
    return kept if any(kept) else None


def _drift_policies(model: KTMModel, policies: Sequence[str] | None) -> list[str]:
    if policies is None:
        return [model.merge_policy]
    if isinstance(policies, (str, bytes)) or not isinstance(policies, Sequence) or not policies:
        raise KTMError(f"policies must be a non-empty list, got {policies!r}", "use e.g. --policies fixed budget")
    for policy in policies:
        check_policy(policy, model.segment_tokens, model.token_scores.score, model.ks, model.compressor.name)
    return list(dict.fromkeys(policies))


def _drift_ks(model: KTMModel, ks: Sequence[int] | None, policies: Sequence[str] = ("fixed",)) -> list[int]:
    """The K values drift scores: those asked for (each one the checkpoint has, unless a budget policy
    averages to it), else its K > 1."""
    if ks is None:
        return [k for k in model.ks if k > 1] or [1]
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or not ks:
        raise KTMError(f"ks must be a non-empty list of K values, got {ks!r}", f"use K in {model.ks}, e.g. --ks {model.ks[-1]}")
    ks = sorted({check_k(k) for k in ks})
    missing = [] if "budget" in policies else [k for k in ks if k not in model.ks]
    if missing:
        raise KTMError(f"K={', '.join(map(str, missing))} is not in this checkpoint's ks {model.ks}",
                       f"use K in {model.ks}, e.g. --ks {' '.join(map(str, model.ks))}")
    return ks


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before a text with add_special_tokens (a BOS, or nothing)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def drift_windows(tokenizer, texts: Sequence[str], prefix_tokens: int, continuation_tokens: int,
                  max_texts: int | None = None, lead: Sequence[int] = ()) -> tuple[list[list[int]], list[list[int]], int]:
    """(prompt ids, continuation ids, skipped): each text long enough gives its first prefix_tokens tokens
    (after `lead`, the BOS) and the next continuation_tokens; shorter texts are counted in `skipped`."""
    need, prompts, targets, skipped = prefix_tokens + continuation_tokens, [], [], 0
    for start in range(0, len(texts), 256):  # in chunks: max_texts stops tokenizing a big file early
        for ids in tokenizer(list(texts[start : start + 256]), add_special_tokens=False)["input_ids"]:
            if max_texts is not None and len(prompts) == max_texts:
                return prompts, targets, skipped
            if len(ids) < need:
                skipped += 1
                continue
            prompts.append([*lead, *ids[:prefix_tokens]])
            targets.append(list(ids[prefix_tokens:need]))
    return prompts, targets, skipped


def _untie_output_embeddings(lm: nn.Module, embed: nn.Module) -> None:
    """Give an LM head that shares the input embedding's weight its own copy, and record it in the config
    so neither peft's merge nor transformers' tie_weights ties (or warns about) them again."""
    head = lm.get_output_embeddings()
    layer = getattr(head, "base_layer", head)  # peft wraps a LoRA-targeted head around the original Linear
    if layer is not None and layer.weight.data_ptr() == embed.weight.data_ptr():
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    lm.config.tie_word_embeddings = False


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p * keep)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)
