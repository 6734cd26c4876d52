"""Two attention kernels for the CPU, registered with transformers under their names (model.attention,
`KTMModel.use_attention`, `ktm bench --attention`).

`eager_float32`: attention computed in float32 outside autocast, a kernel for training on CPU in bf16-mixed.

On 2 CPU cores, SDPA's backward costs ~9 ms per layer call on the short merged prompts of the tree (about 20
positions at K=4), most of a K=4 step's non-matmul time. transformers' eager attention is 3x cheaper there, but
under bf16 autocast its scores are a bfloat16 matmul: rounded to 8 bits of mantissa before the softmax, where
SDPA's kernel keeps them in float32. This kernel does the whole attention (scores, softmax, weighted sum) in
float32 from the float32 query and key that rotary embedding already gives under autocast:

    softmax(q kᵀ · scale + mask) v        all in float32, output cast back to the value's dtype

It is as cheap as eager attention on short prompts and slower than SDPA on long ones (its float32 matmuls:
1.5x SDPA's time at 300 positions), so it suits merged prompts.

`blocked_causal`: attention as large matrix products over blocks of queries, for long prefills and for training
(the tree's short merged prompts: its backward is a few GEMMs where SDPA's CPU backward cost ~3 ms a layer). PyTorch's CPU
SDPA kernel (flash-style, 32-position tiles) ran at a fraction of the GEMM rate here: 36% of a bfloat16 2048-token
prefill of Qwen2.5-0.5B for 11% of its FLOPs (README Speed). This kernel takes `block` queries at a time, all the
query heads of one key/value head together (grouped queries need no copy of keys or values), and only the keys
that causality lets them see:

    s = (q[i:j] · scale) k[:j]ᵀ   one GEMM in the inputs' dtype (bfloat16 scores when the model is bfloat16)
    p = softmax(s + mask)         summed in float32 (PyTorch's kernel does so for 16-bit inputs), stored in s's
                                  dtype; future keys (and the mask's zeros) get that dtype's lowest value
    out[i:j] = p v[:j]            one GEMM in the value's dtype

Its scores are rounded to the inputs' dtype before the softmax, as transformers' eager kernel does; SDPA keeps
them in float32. It is exact in float32 and within bfloat16 rounding otherwise (tested against float64).
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "eager_float32"
BLOCKED = "blocked_causal"
KERNELS = (NAME, BLOCKED)  # the names register() knows
CHOICES = ("auto", "sdpa", "eager", *KERNELS)  # model.attention, ktm bench --attention (auto: resolve below)
# "auto": the kernel measured fastest on each device (README Speed: blocked_causal trained tree K=4 steps 1.3x
# and prefilled 512-2048 tokens 1.16-1.27x faster than SDPA on 2 CPU cores; CUDA keeps SDPA's fused kernels)
AUTO = {"cpu": BLOCKED}


def resolve(name: str, device_type: str) -> str:
    """The kernel that `name` means on a device of `device_type` ("cpu", "cuda", ...): "auto" is AUTO's choice
    (sdpa where AUTO has none), any other name is itself."""
    return AUTO.get(device_type, "sdpa") if name == "auto" else name


def eager_float32_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract: query (B, H, T, D), key/value (B, H_kv, S, D) with H a multiple
    of H_kv (grouped queries), an additive mask broadcastable to (B, H, T, S); returns ((B, T, H, D), weights)."""
    groups = query.shape[1] // key.shape[1]
    out_dtype = value.dtype
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.float(), key.float(), value.float()
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]].float()
        weights = torch.softmax(scores, dim=-1)
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        out = torch.matmul(weights, v)
    return out.transpose(1, 2).contiguous().to(out_dtype), weights


def blocked_causal_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                             block: int = 64, **kwargs):
    """The same contract as eager_float32_attention; `attention_mask` is SDPA's (None = causal, else boolean with
    True = attend, or additive). The T queries are the last T of the S keys (a prefill: T = S; a decode step: T = 1).
    Returns ((B, T, H, D), None): no weights are kept. Blocks of 64 queries: at 128 and more the float32 scores
    of a block outgrow the cache and the kernel ran 2x slower (2 EPYC cores, 14 heads, 2048 positions)."""
    B, H, T, D = query.shape
    H_kv, S = key.shape[1], key.shape[2]
    groups, offset = H // H_kv, S - T
    q = (query * scaling).view(B, H_kv, groups, T, D)
    out = query.new_empty(B, H_kv, groups, T, D, dtype=value.dtype)
    for start in range(0, T, block):
        end = min(T, start + block)
        visible = offset + end  # keys any query of the block may see
        rows = end - start
        scores = torch.matmul(q[:, :, :, start:end].reshape(B, H_kv, groups * rows, D), key[:, :, :visible].transpose(2, 3))
        scores = scores.view(B, H_kv, groups, rows, visible)
        lowest = torch.finfo(scores.dtype).min
        if attention_mask is None:  # causal: only the block's own keys can lie in a query's future
            future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
            scores[..., offset + start:].masked_fill_(future, lowest)
        else:
            part = attention_mask[:, :, start:end, :visible]  # (B or 1, 1 or H, rows, visible)
            part = part.unsqueeze(2) if part.shape[1] == 1 else part.reshape(-1, H_kv, groups, rows, visible)
            if part.dtype == torch.bool:
                scores.masked_fill_(~part, lowest)
            else:
                scores.add_(part.to(scores.dtype)).clamp_(min=lowest)
        weights = torch.softmax(scores, dim=-1).to(value.dtype)  # PyTorch's softmax sums in float32 for 16-bit inputs
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
        out[:, :, :, start:end] = torch.matmul(weights.view(B, H_kv, groups * rows, visible),
                                               value[:, :, :visible]).view(B, H_kv, groups, rows, D)
    return out.view(B, H, T, D).transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Make a kernel of this file (eager_float32 or blocked_causal) known to transformers (idempotent); returns
    its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    if name == BLOCKED:
        AttentionInterface.register(BLOCKED, blocked_causal_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(BLOCKED, sdpa_mask)  # None when causal alone suffices, else boolean
        return BLOCKED
    AttentionInterface.register(NAME, eager_float32_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)  # the additive mask eager attention takes (else: none)
    return NAME
