"""Self-attention whose heads and embedding width can be pruned independently.

torchvision's ViT uses `nn.MultiheadAttention`, which ties the attention width
to the embedding width (`embed_dim = num_heads * head_dim`) and keeps the
heads inside one fused forward. PASS prunes heads (one "channel" per head: its
q, k, v and output-projection slices go together) and, separately, the
residual embedding width, so both the masked search network and the extracted
network need an attention module where the two are independent.

`SelfAttention` is that module. It keeps the parameter names of
`nn.MultiheadAttention` (`in_proj_weight`, `in_proj_bias`, `out_proj.*`), so a
converted model has exactly the same state-dict keys as the torchvision one,
and its forward has the same signature and returns `(output, None)` as
torchvision's encoder block expects. It computes the same function as
`nn.MultiheadAttention(batch_first=True)` with `need_weights=False`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim, self.dropout = embed_dim, num_heads, head_dim, dropout
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)
        # Set by pruning.masking during search: a (num_heads,) 0/1 mask, straight-through in backward.
        self.head_mask: torch.Tensor | None = None

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SelfAttention":
        """Convert torchvision's self-attention, sharing (not copying) its parameters."""
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn):
            raise ValueError("only batch-first self-attention with packed q/k/v projections can be converted")
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, mha.dropout, bias=mha.in_proj_bias is not None)
        new.in_proj_weight = mha.in_proj_weight
        new.in_proj_bias = mha.in_proj_bias
        new.out_proj = mha.out_proj
        return new

    def forward(self, query, key=None, value=None, need_weights: bool = False, **unused):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention computes self-attention only (query, key and value must be one tensor)")
        b, t, _ = query.shape
        h, d = self.num_heads, self.head_dim
        qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2],
                                             dropout_p=self.dropout if self.training else 0.0)
        if self.head_mask is not None:
            out = out * self.head_mask.to(out.dtype).view(1, h, 1, 1)
        out = out.transpose(1, 2).reshape(b, t, h * d)
        return self.out_proj(out), None

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


def convert_attention(model: nn.Module) -> nn.Module:
    """Replace every `nn.MultiheadAttention` in `model` (in place) by a `SelfAttention` sharing its weights."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(module, child_name, SelfAttention.from_multihead(child))
    return model
