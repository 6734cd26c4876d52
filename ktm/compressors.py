"""Prompt compressors: what the LM reads in place of a prompt, all at the merge's own length.

Every compressor maps one prompt of n token ids and a K to exactly

    L = merged_length(n, K, keep_tail) = head + blocks + tail     (see ktm.model.block_layout)

positions, so every method is compared at the same compression. The registry (`get_compressor`, names
as in `model.compressor`):

    merge             the K-token merge encoder: the method (default)
    none              the prompt uncompressed, whatever K (the K=1 reference: its budget is n)
    truncate_tail     the last L tokens
    truncate_head     the first L - t tokens, then the t tail tokens (t = min(keep_tail, n); all of L when t = 0)
    random_drop       L - t of the first n - t tokens, drawn seeded by their content and `seed`, in order
    self_information  Selective-Context style: drop the lowest-surprisal tokens under the frozen base with
                      the LoRA disabled (one forward pass per prompt), in order
    mean_pool         the mean of each K-block: the merge encoder frozen at its init (the MLP's ablation)
    llmlingua2        keep the tokens LLMLingua-2's classifier rates most worth keeping (the `llmlingua`
                      package and its hub model; refused with one line without them)

Token selectors keep the layout's tail verbatim, as the merge does (the question next to the answer), and
choose the other L - t tokens from the first n - t; with keep_tail = 0 (the paper) they choose from the
whole prompt. Their output keeps the prompt's order.

A prompt's kept span (its last `kept` tokens, from a (text to merge, text to keep) pair, see
KTMModel.encode_prompts) stays untouched with every compressor: `embeddings()` compresses the rest of the
prompt (its n - kept tokens) at that rest's budget and appends the span's own token embeddings, so

    L = budget(n - kept, K, keep_tail) + kept   (= merged_length(n, K, keep_tail, kept) for all but `none`)

A compressor therefore never sees the span: `compress` keeps its contract, custom subclasses included.
Selectors that score tokens score the rest alone (self_information: the same surprisals, as the base is
causal and the span comes last; llmlingua2: its classifier reads the rest's text without the span).

Contract: `compress(model, prompt_ids, k)` returns one entry per prompt, either a list of L token ids
(embedded with the base's own frozen table) or an (L, d) tensor of embeddings. Each prompt is compressed
on its own, never padded together with its neighbours, so KTMModel.build_batch (which left-pads them at the
sequence level, masks the pads and counts positions over real tokens only) gives an example the same
result alone or in any batch. `embeddings()` checks the contract and returns (L_i, d) tensors.

No Lightning here: plain torch + transformers (+ peft for the LoRA switch).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from ktm.errors import KTMError
from ktm.model import block_layout, merged_length
from ktm.policy import TokenScores, content_digest

if TYPE_CHECKING:
    from ktm.model import KTMModel

REGISTRY: dict[str, type["Compressor"]] = {}


def register(cls: type["Compressor"]) -> type["Compressor"]:
    REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return list(REGISTRY)


def check_name(name) -> str:
    if not isinstance(name, str) or name not in REGISTRY:
        raise KTMError(f"unknown model.compressor {name!r}", f"use one of: {', '.join(REGISTRY)}")
    return name


def get_compressor(name: str, **kwargs) -> "Compressor":
    return REGISTRY[check_name(name)](**kwargs)


def keep_highest(scores: Sequence[float], want: int) -> list[int]:
    """Ascending indices of the `want` highest scores. Ties keep the earlier position (drop the later)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:want])


class Compressor:
    """Base class: subclasses set `name` and implement `compress`."""

    name: ClassVar[str] = ""
    uses_encoder: ClassVar[bool] = False  # reads the model's merge encoders (and so trains them)

    def budget(self, n: int, k: int, keep_tail: int = 0) -> int:
        """How many positions a prompt of n tokens becomes."""
        return merged_length(n, k, keep_tail)

    def compress(self, model: "KTMModel", prompt_ids: Sequence[Sequence[int]], k: int) -> list:
        """Per prompt: a list of `budget` token ids, or a (budget, d) tensor of embeddings."""
        raise NotImplementedError

    def embeddings(self, model: "KTMModel", prompt_ids: Sequence[Sequence[int]], k: int,
                   kept: Sequence[int] | None = None) -> list[torch.Tensor]:
        """compress(), checked against the budget, as one (L_i, d) tensor per prompt on the model's device.
        `kept[i]` last tokens of prompt i are its kept span: only the rest is compressed, and the span's token
        embeddings follow it (module docstring)."""
        spans: list[list[int]] = []
        if kept is not None and any(kept):
            spans = [list(p[len(p) - c :]) if c else [] for p, c in zip(prompt_ids, kept, strict=True)]
            prompt_ids = [list(p[: len(p) - c]) if c else p for p, c in zip(prompt_ids, kept)]
        out = self.compress(model, prompt_ids, k)
        for p, o in zip(prompt_ids, out, strict=True):
            want = self.budget(len(p), k, model.keep_tail)
            if len(o) != want:  # not `assert`: a custom compressor breaking the contract must not pass under -O
                raise AssertionError(f"compressor {self.name!r} returned {len(o)} positions for a {len(p)}-token prompt at K={k}, not {want}")
        if spans and out and not torch.is_tensor(out[0]):
            out = [list(o) + s if s else o for o, s in zip(out, spans)]  # token ids: the span joins the one lookup below
        elif spans:
            emb = model.embed_rows(spans)
            out = [torch.cat([o, emb[i, : len(s)].to(o.dtype)]) if s else o for i, (o, s) in enumerate(zip(out, spans))]
        if not out or torch.is_tensor(out[0]):
            return out
        emb = model.embed_rows(out)  # one lookup for the batch, as _blocks does
        return [emb[i, : len(o)] for i, o in enumerate(out)]


@register
class Merge(Compressor):
    """The method: head tokens, each K-block through the merge encoder, tail tokens. KTMModel.build_batch
    runs this inline (no per-example concatenation); `compress` is the same computation, for callers that
    want the pieces on their own."""

    name = "merge"
    uses_encoder = True

    def merge_blocks(self, model: "KTMModel", blocks: torch.Tensor, k: int) -> torch.Tensor:
        return model._encoder(k)(blocks)

    def compress(self, model, prompt_ids, k):
        emb, layouts, blocks = model._blocks(prompt_ids, k)
        merged = self.merge_blocks(model, blocks, k).to(emb.dtype).split([m for _, m, _ in layouts])
        return [torch.cat([emb[i, :h], merged[i], emb[i, len(p) - t : len(p)]])
                for i, (p, (h, m, t)) in enumerate(zip(prompt_ids, layouts))]


@register
class MeanPool(Merge):
    """The mean of each K-block: exactly what the merge encoder outputs at its init (its MLP's last layer
    starts at zero), kept there. The ablation of the MLP."""

    name = "mean_pool"
    uses_encoder = False

    def merge_blocks(self, model, blocks, k):
        from ktm.model import check_k

        check_k(k)
        return blocks.mean(dim=-2)  # the very op MergeEncoder.parts computes: equal at init, bit for bit


@register
class NoCompression(Compressor):
    """The prompt as it is, whatever K: the uncompressed reference (K=1)."""

    name = "none"

    def budget(self, n, k, keep_tail=0):
        return n

    def compress(self, model, prompt_ids, k):
        return [list(p) for p in prompt_ids]


class TokenSelector(Compressor):
    """Keeps L of a prompt's tokens in order: the layout's tail verbatim, and `keep(...)` of the rest."""

    def keep(self, model: "KTMModel", body: list[int], want: int) -> Sequence[int]:
        """Ascending indices of the `want` tokens of `body` (0 < want < len(body)) to keep."""
        raise NotImplementedError

    def compress(self, model, prompt_ids, k):
        from ktm.model import check_k

        check_k(k)
        out = []
        for ids in prompt_ids:
            ids = list(ids)
            n = len(ids)
            head, blocks, tail = block_layout(n, k, model.keep_tail)
            body, want = ids[: n - tail], head + blocks
            idx = range(len(body)) if want >= len(body) else list(self.keep(model, body, want))
            if any(b <= a for a, b in zip(idx, idx[1:])) or (len(idx) and not 0 <= idx[0] <= idx[-1] < len(body)):
                raise AssertionError(f"compressor {self.name!r} kept positions out of order or out of range")
            out.append([body[i] for i in idx] + ids[n - tail :])
        return out


@register
class TruncateTail(TokenSelector):
    """The last L tokens (the end of the prompt, next to the answer)."""

    name = "truncate_tail"

    def keep(self, model, body, want):
        return range(len(body) - want, len(body))


@register
class TruncateHead(TokenSelector):
    """The first L tokens (before the tail, if keep_tail > 0)."""

    name = "truncate_head"

    def keep(self, model, body, want):
        return range(want)


@register
class RandomDrop(TokenSelector):
    """A random subset, in order. The draw is seeded by the prompt's tokens and `seed`, so an example gets
    the same tokens alone, in any batch, and in every epoch; another seed gives another draw."""

    name = "random_drop"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def keep(self, model, body, want):
        rng = random.Random(int.from_bytes(content_digest(f"random_drop:{self.seed}", body), "big"))
        return sorted(rng.sample(range(len(body)), want))


@register
class SelfInformation(TokenSelector):
    """Selective Context (Li et al., 2023) at token level: drop the tokens the frozen base finds least
    surprising, -log p(x_i | x_<i), from one forward pass over the prompt with the LoRA disabled (peft's
    `disable_adapter()`; the bare base when there is no LoRA), in eval mode. The first token has no context
    to be scored in and is always kept. Ties drop the later token. The base never trains, so the scores are
    cached per prompt (`cache_size` entries, the adaptive-K policy's TokenScores): later epochs and every K
    cost no forward pass."""

    name = "self_information"

    def __init__(self, cache_size: int = 100_000):
        self.scores = TokenScores("surprisal", cache_size)

    def surprisal(self, model: "KTMModel", ids: Sequence[int]) -> torch.Tensor:
        """(n,) float32 surprisal in nats of each token under the frozen base; +inf for the first."""
        return torch.tensor(self.scores(model, ids), dtype=torch.float32)

    def keep(self, model, body, want):
        return keep_highest(list(self.scores(model, body)), want)


@register
class LLMLingua2(TokenSelector):
    """LLMLingua-2 (Pan et al., 2024) through the `llmlingua` package: its token classifier (a hub model)
    rates every word of the prompt's text; each of our tokens gets the highest keep-probability of the
    classifier tokens its characters overlap (0 for pure whitespace), and the L - t best are kept, in order
    (ties keep the earlier). Windows of the classifier's 512 positions. For users with a hub: without the
    package or the model it is refused with one line naming the fix. Not exercised here on the real hub
    model (no network); the mapping is tested with a stand-in classifier."""

    name = "llmlingua2"
    MODEL = "microsoft/llmlingua-2-xlm-roberta-large-meetingbank"
    _FIX = "pip install llmlingua (it downloads {model} from the Hugging Face hub on first use), or choose another model.compressor"

    def __init__(self, model_name: str = MODEL):
        self.model_name = model_name
        self._prompt_compressor = None
        self._import()  # a missing package fails when the model is built, not at its first batch

    def _import(self):
        try:
            from llmlingua import PromptCompressor
        except ImportError as exc:
            raise KTMError(f"model.compressor=llmlingua2 needs the llmlingua package, which cannot be imported ({_line(exc)})",
                           self._FIX.format(model=self.model_name)) from None
        return PromptCompressor

    def _load(self, device: torch.device):
        if self._prompt_compressor is None:
            PromptCompressor = self._import()
            try:
                self._prompt_compressor = PromptCompressor(model_name=self.model_name, device_map=device.type, use_llmlingua2=True)
            except Exception as exc:  # noqa: BLE001  (hub errors come as OSError, ValueError, requests/httpx errors...)
                raise KTMError(f"llmlingua2 cannot load its hub model {self.model_name} ({_line(exc)})",
                               "connect to the Hugging Face hub once to download it (HF_HUB_OFFLINE unset), "
                               "or choose another model.compressor") from None
        return self._prompt_compressor

    @torch.no_grad()
    def scores(self, model: "KTMModel", body: Sequence[int]) -> list[float]:
        """Keep-probability of each of `body`'s tokens."""
        pc = self._load(model.embed.weight.device)
        tok, clf = pc.tokenizer, pc.model
        pieces = model.tokenizer.batch_decode([[t] for t in body])
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        starts = [0] + ends[:-1]
        enc = tok("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        specials = [t for t in (tok.cls_token_id, tok.sep_token_id) if t is not None]
        window = getattr(pc, "max_seq_len", 512) - len(specials)
        device = next(clf.parameters()).device
        probs: list[float] = []
        for s in range(0, len(ids), window):
            chunk = ids[s : s + window]
            cls, sep = ([tok.cls_token_id], [tok.sep_token_id]) if specials else ([], [])
            logits = clf(input_ids=torch.tensor([cls + chunk + sep], device=device)).logits[0]
            probs += logits[len(cls) : len(cls) + len(chunk)].float().softmax(-1)[:, 1].tolist()
        score = [0.0] * len(body)
        for (a, b), p in zip(offsets, probs):
            i = bisect_right(ends, a)  # our first token whose span reaches past character a
            while i < len(body) and starts[i] < b:
                if ends[i] > starts[i]:
                    score[i] = max(score[i], p)
                i += 1
        return score

    def keep(self, model, body, want):
        return keep_highest(self.scores(model, body), want)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__
