"""Adaptive K (`model.merge_policy`): where a prompt is dense, merge less; where it is predictable, merge more.

A layout is a list of *runs* covering the prompt in order, (tokens, K) each: a run with K = 1 stays in
tokens, one with K > 1 becomes tokens / K blocks, each read by the K merge encoder. Its merged length is
sum(tokens / K).

    fixed   one K for the whole body (ktm.model.block_layout): [head, 1] [m*K, K] [tail, 1]. The paper.
    budget  the body (the prompt before its tail and kept span) is cut into windows of W tokens
            (`segment_tokens`), aligned to the body's end; a shorter leading window keeps the target K
            (or, when ks lack it, the K of ks that makes it shortest) and does not adapt. Every window starts at the largest K,
            then windows are refined one K step at a time (K -> the next smaller K of ks), the one with the
            highest score x its current K first, while the merged length stays within the fixed layout's:

                score_j x K_j  is the gain per position spent of halving window j's K when the information
                a window loses grows with log K, so windows of equal score end at one K (the target when
                ks hold it) and a dense window goes further down before a predictable one moves.

            When no whole window's step fits, the best window left is refined block by block up to the
            budget, so the prompt ends within one block's refinement (K/K' - 1 positions, 0 for ks that
            double) of the fixed length, and never above it (unless its leading window alone overshoots).

The score of a window is the mean surprisal -log p(x_i | x_<i) of its tokens under the frozen base
(`token_surprisal`: the base with the LoRA disabled, one forward pass per prompt, cached by content), so an
example gets the same layout alone or in any batch. `random` draws a score from the window's own tokens
instead: the control that says whether surprisal carries the gain. Every K of ks must divide W, so windows
merge without remainder; the kept span and keep_tail stay in tokens as with `fixed`.

No Lightning here: plain torch, like the rest of the method layer.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from typing import TYPE_CHECKING, Sequence

import torch

from ktm.errors import KTMError, check_choice, check_count

if TYPE_CHECKING:
    from ktm.model import KTMModel

POLICIES = ("fixed", "budget")  # model.merge_policy
SCORES = ("surprisal", "random")  # model.policy_score
# model.merged_positions: where the base sees each merged embedding. "compact" (the paper): the merged sequence is
# counted 0, 1, 2, ... "spread": at the position of its block's last token in the uncompressed prompt, kept tokens and
# the answer at their own (runs_teacher_positions), so rotary distances are those of the uncompressed text.
MERGED_POSITIONS = ("compact", "spread")
Runs = list[tuple[int, int]]


def check_policy(policy, segment_tokens, score, ks: Sequence[int], compressor: str = "merge") -> None:
    """One clear line for a merge policy that cannot run with these settings."""
    check_choice("model.merge_policy", policy, POLICIES, "use fixed (one K per prompt, the paper) or budget (a K per segment by content)")
    check_choice("model.policy_score", score, SCORES, "use surprisal (the frozen base's) or random (the control)")
    check_count("model.segment_tokens", segment_tokens, 1, "set it to e.g. 16")
    bad = [k for k in ks if segment_tokens % k]
    if policy == "budget" and bad:
        raise KTMError(f"model.segment_tokens={segment_tokens} is not a multiple of K={bad[0]} of model.ks {list(ks)}",
                       f"use a multiple of {math.lcm(*ks)} (e.g. {math.lcm(*ks) * max(1, 16 // math.lcm(*ks))})")
    if policy == "budget" and compressor != "merge":
        raise KTMError(f"model.merge_policy=budget picks a merge encoder per segment, and compressor {compressor!r} has none",
                       "use model.merge_policy=fixed with a baseline compressor")


def runs_length(runs: Runs) -> int:
    """Positions the LM reads for a layout."""
    return sum(t // k for t, k in runs)


def fixed_runs(n: int, k: int, keep_tail: int = 0, kept: int = 0) -> Runs:
    """ktm.model.block_layout as runs (empty runs left out)."""
    from ktm.model import block_layout

    return layout_runs(*block_layout(n, k, keep_tail, kept), k)


def layout_runs(head: int, blocks: int, tail: int, k: int) -> Runs:
    """A (head, blocks, tail) layout of ktm.model.block_layout as runs (empty runs left out)."""
    return [r for r in ((head, 1), (blocks * k, k), (tail, 1)) if r[0]]


def _lead_runs(r: int, k: int, ks: Sequence[int]) -> Runs:
    """The leading window shorter than W: laid out at the target K as the fixed layout does when ks has it,
    else at the K of ks (or 1) that makes it shortest (ties: the smaller K)."""
    if k not in ks:
        k = min({1, *ks}, key=lambda c: (r % c + r // c, c))
    return [x for x in ((r % k, 1), (r - r % k, k)) if x[0]]


def allocate(scores: Sequence[float], ks: Sequence[int], window: int, slack: int) -> list[Runs]:
    """Runs of each of len(scores) windows of `window` tokens that start at the largest K and together may
    grow by at most `slack` positions (module docstring: greedy on score x K, then one window block by block)."""
    levels = sorted(set(ks), reverse=True)  # coarse to fine
    level = [0] * len(scores)
    heap = [(-s * levels[0], j) for j, s in enumerate(scores)] if len(levels) > 1 else []
    heapq.heapify(heap)
    left_over = []  # windows whose next whole step did not fit, best first (slack only shrinks: it never will)
    while heap:
        _, j = heapq.heappop(heap)
        k, finer = levels[level[j]], levels[level[j] + 1]
        cost = window // finer - window // k
        if cost > slack:
            left_over.append(j)
            continue
        slack -= cost
        level[j] += 1
        if level[j] + 1 < len(levels):
            heapq.heappush(heap, (-scores[j] * finer, j))
    runs = [[(window, levels[lv])] for lv in level]
    for j in left_over:  # the rest of the budget: the first blocks of the best window that can use it
        k, finer = levels[level[j]], levels[level[j] + 1]
        blocks = slack // (k // finer - 1)
        if blocks:
            runs[j] = [(blocks * k, finer), (window - blocks * k, k)]
            break
    return runs


def budget_runs(n: int, k: int, ks: Sequence[int], window: int, token_scores: Sequence[float], keep_tail: int = 0,
                kept: int = 0) -> Runs:
    """The budget layout of a prompt of n tokens at target ratio K; `token_scores` score its body's tokens
    (the first n - tail; non-finite scores, such as the first token's surprisal, are left out of the means)."""
    from ktm.model import merged_length

    tail = min(keep_tail + kept, n)
    body = n - tail
    lead, count = body % window, body // window
    if len(token_scores) < body:
        raise ValueError(f"{len(token_scores)} token scores for a body of {body} tokens")
    scores = []
    for j in range(count):
        part = [s for s in token_scores[lead + j * window : lead + (j + 1) * window] if math.isfinite(s)]
        scores.append(math.fsum(part) / len(part) if part else 0.0)
    ks = [c for c in ks if c > 0]
    head, end = _lead_runs(lead, k, ks), [(tail, 1)] if tail else []
    slack = merged_length(n, k, keep_tail, kept) - runs_length(head + [(window, max(ks))] * count + end)
    windows = allocate(scores, ks, window, max(slack, 0))
    return _joined(head + [r for w in windows for r in w] + end)


def _joined(runs: Runs) -> Runs:
    """Neighbouring runs of the same K as one (the same blocks: runs hold whole blocks)."""
    out: Runs = []
    for t, k in runs:
        if out and out[-1][1] == k:
            out[-1] = (out[-1][0] + t, k)
        else:
            out.append((t, k))
    return out


def moved_tokens(runs: Runs, reference: Runs) -> int:
    """Tokens of one prompt that two layouts of it merge at different K (0 when they are the same): how far
    a budget layout departs from the fixed one, reported as `adapted_share` at evaluation."""
    def per_token(layout: Runs) -> list[int]:
        return [k for t, k in layout for _ in range(t)]

    return sum(a != b for a, b in zip(per_token(runs), per_token(reference)))


def runs_teacher_positions(runs: Runs, targets: int = 0) -> list[int]:
    """ktm.model.teacher_positions for any layout: a token with itself, a block with its last token."""
    out, p = [], 0
    for t, k in runs:
        out += list(range(p, p + t)) if k == 1 else [p + (b + 1) * k - 1 for b in range(t // k)]
        p += t
    return out + list(range(p, p + targets))


def content_digest(salt, ids: Sequence[int]) -> bytes:
    """16 bytes naming a token sequence under a salt: the key of per-prompt caches and seeded draws."""
    return hashlib.blake2b(f"{salt}|".encode() + array("q", ids).tobytes(), digest_size=16).digest()


@torch.no_grad()
def token_surprisal(model: "KTMModel", ids: Sequence[int]) -> torch.Tensor:
    """(n,) float32 surprisal in nats of each token under the frozen base (LoRA disabled, eval mode: no
    dropout, even mid-training); +inf for the first token, which has no context."""
    if model.lora_merged:
        raise KTMError("surprisal scores tokens under the base without LoRA, but this copy has its LoRA merged "
                       "into the base weights (merged_for_serving)", "score with the unmerged model")
    lm = model.lm
    x = torch.as_tensor([list(ids)], dtype=torch.long, device=model.embed.weight.device)
    modes = [(m, m.training) for m in lm.modules()]
    lm.eval()
    try:
        with model.bare_base():
            logits = lm(input_ids=x, use_cache=False).logits[0, :-1].float()
    finally:
        for m, mode in modes:
            m.training = mode
    s = torch.full((x.shape[1],), math.inf)
    s[1:] = (logits.logsumexp(-1) - logits.gather(-1, x[0, 1:, None]).squeeze(-1)).cpu()
    return s


class TokenScores:
    """Per-token scores of a prompt body by `score` (SCORES), cached by content (`cache_size` entries): the
    base never trains, so later epochs and every K of an evaluation reuse one forward pass."""

    def __init__(self, score: str = "surprisal", cache_size: int = 100_000):
        self.score, self.cache_size = score, cache_size
        self._cache: dict[bytes, array] = {}

    def __call__(self, model: "KTMModel", ids: Sequence[int]) -> array:
        key = content_digest(self.score, ids)
        hit = self._cache.get(key)
        if hit is None:
            if self.score == "random":
                g = torch.Generator().manual_seed(int.from_bytes(key[:8], "big"))
                hit = array("f", torch.rand(len(ids), generator=g).tolist())
            else:
                hit = array("f", token_surprisal(model, ids).tolist()) if ids else array("f")
            if len(self._cache) >= self.cache_size:
                self._cache.pop(next(iter(self._cache)))  # the oldest entry
            self._cache[key] = hit
        return hit
