"""The merge encoder: K consecutive token embeddings -> one latent embedding.

    block  = [e_1; e_2; ...; e_K]                      (K*d, the K embeddings concatenated)
    m      = mean(e_1..e_K)                            (d)
    c      = MLP(block)                                (d, the learned correction)
    MLP    = Linear(K*d, h) -> ReLU -> Linear(h, K*d) -> ReLU -> Linear(K*d, d)      (shape "paper")
    MLP    = Linear(K*d, h) -> ReLU -> Linear(h, d)                                (shape "shallow")
    output = m + c                                     (bound = None: the paper's encoder)
    output = m + c * b|m| / (b|m| + |c|)               (bound = b: ours, the default b = 1)

The MLP's last layer starts at zero, so at step 0 the encoder outputs exactly the mean of its K
embeddings: training starts from a sensible, already-working compression instead of noise.
K = 1 is the identity (no parameters): the uncompressed baseline.

Why "shallow": the paper's middle layer (h x K*d) is the largest, 8.0 M of the 17.3 M weights at K=4 on d=576,
and with the first it makes the encoder ~11% of a K=4 prefill's FLOPs (README Speed). Dropping it keeps the
first layer's width and the zero-initialised output layer, so training still starts at the mean.

Why the bound: with the paper's free correction, an encoder lr that suits one K lets another K's
correction grow to tens or hundreds of times the mean (measured: 31x at K=2 and 199x at K=4 on the tree),
and the merged embeddings become noise the LM cannot read. The soft bound keeps |output - m| < b|m| for
every block whatever the lr or the MLP's output, is the identity to first order near 0 (so learning starts
exactly as in the paper), and is smooth, so gradients never switch off.
"""

from __future__ import annotations

import torch
from torch import nn


def hidden_multiplier(k: int) -> float:
    """f in h = int(f*K)*d. The paper: 2.0 for K<=3, 1.5 for K=4. Our rule for K>=5: 1.0, so the hidden
    width grows linearly with K (K=8 -> 8d) instead of the paper's K=4 ratio (which would give 12d)."""
    if k <= 3:
        return 2.0
    if k == 4:
        return 1.5
    return 1.0


def hidden_size(k: int, d: int, multiplier: float | None = None) -> int:
    f = hidden_multiplier(k) if multiplier is None else multiplier
    return max(1, int(f * k)) * d


SHAPES = ("paper", "shallow")  # model.encoder_shape


def encoder_parameters(k: int, d: int, multiplier: float | None = None, shape: str = "paper") -> int:
    """Parameters of MergeEncoder(k, d, multiplier, shape=shape), from its layers below, without building it (the
    settings check refuses a K whose encoder would not fit in memory before allocating it)."""
    if k == 1:
        return 0
    h = hidden_size(k, d, multiplier)
    if shape == "shallow":
        return (k * d * h + h) + (h * d + d)
    return (k * d * h + h) + (h * k * d + k * d) + (k * d * d + d)


class MergeEncoder(nn.Module):
    """Merge blocks of K embeddings. Input (..., K, d) or (..., K*d); output (..., d)."""

    def __init__(self, k: int, d: int, multiplier: float | None = None, bound: float | None = 1.0, shape: str = "paper"):
        super().__init__()
        self.k, self.d, self.bound = k, d, bound
        if k == 1:
            self.mlp = None
            return
        h = hidden_size(k, d, multiplier)
        first = nn.Linear(k * d, h)  # built (and its weights drawn) first: a seed gives the same encoder as before the shapes
        tail = [nn.Linear(h, d)] if shape == "shallow" else [nn.Linear(h, k * d), nn.ReLU(), nn.Linear(k * d, d)]
        self.mlp = nn.Sequential(first, nn.ReLU(), *tail)
        nn.init.zeros_(self.mlp[-1].weight)  # output == mean at init
        nn.init.zeros_(self.mlp[-1].bias)

    def parts(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mean, learned correction) of each block; the output is their sum. The correction is 0 at init."""
        if blocks.shape[-1] != self.d:  # (..., K*d) -> (..., K, d): a view, no copy
            blocks = blocks.unflatten(-1, (self.k, self.d))
        if self.mlp is None:
            return blocks.squeeze(-2), None
        mean = blocks.mean(dim=-2)
        correction = self.mlp(blocks.flatten(-2).to(self.mlp[0].weight.dtype)).to(mean.dtype)
        if self.bound is not None:
            limit = self.bound * mean.norm(dim=-1, keepdim=True)
            correction = correction * (limit / (limit + correction.norm(dim=-1, keepdim=True)).clamp(min=1e-12))
        return mean, correction

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        mean, correction = self.parts(blocks)
        return mean if correction is None else mean + correction
