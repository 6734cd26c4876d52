"""`eager_float32`: attention computed in float32 outside autocast, a kernel for training on CPU in bf16-mixed.

On 2 CPU cores, SDPA's backward costs ~9 ms per layer call on the short merged prompts of the tree (about 20
positions at K=4), most of a K=4 step's non-matmul time. transformers' eager attention is 3x cheaper there, but
under bf16 autocast its scores are a bfloat16 matmul: rounded to 8 bits of mantissa before the softmax, where
SDPA's kernel keeps them in float32. This kernel does the whole attention (scores, softmax, weighted sum) in
float32 from the float32 query and key that rotary embedding already gives under autocast:

    softmax(q kᵀ · scale + mask) v        all in float32, output cast back to the value's dtype

It is as cheap as eager attention on short prompts and slower than SDPA on long ones (its float32 matmuls:
1.5x SDPA's time at 300 positions), so it suits merged prompts. Registered with transformers under this name;
`KTMModel.use_attention("eager_float32")` (model.attention) selects it.
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "eager_float32"


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


def register() -> str:
    """Make the kernel known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, eager_float32_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)  # the additive mask eager attention takes (else: none)
    return NAME
