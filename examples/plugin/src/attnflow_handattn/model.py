"""A small transformer whose attention returns nothing but its output (fused SDPA): the plugin's model family."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class HandAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``: the weights never exist."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        return x.view(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (batch, tokens, dim); ``padding``: (batch, tokens) bool, True on padding tokens."""
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        allowed = None if padding is None else ~padding[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(x.shape))


class HandBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = HandAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), padding)
        return x + self.mlp(self.norm2(x))


class HandAttentionNet(nn.Module):
    """Token embeddings, ``layers`` blocks of :class:`HandAttention`, a final norm."""

    def __init__(self, vocab: int = 17, dim: int = 15, heads: int = 3, layers: int = 3, hidden: int = 11,
                 max_tokens: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_tokens, dim)
        self.blocks = nn.ModuleList([HandBlock(dim, heads, hidden) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed(input_ids) + self.positions(torch.arange(input_ids.shape[1], device=input_ids.device))
        padding = None if attention_mask is None else attention_mask == 0
        for block in self.blocks:
            x = block(x, padding)
        return self.norm(x)
