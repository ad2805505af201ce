"""Encoders: the gene-expression MLP, the tile projection and gated attention-MIL pooling."""

from __future__ import annotations

import torch
from torch import nn


def _block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU(), nn.Dropout(dropout))


class GeneEncoder(nn.Module):
    """Expression vector (B, G) → embedding (B, D): Linear → LayerNorm → GELU → Dropout blocks."""

    def __init__(self, n_genes: int, hidden: int, layers: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        widths = [n_genes] + [hidden] * (layers - 1) + [out_dim]
        self.blocks = nn.Sequential(*(_block(a, b, dropout) for a, b in zip(widths[:-1], widths[1:])))
        self.out_dim = out_dim

    def forward(self, genes: torch.Tensor) -> torch.Tensor:
        return self.blocks(genes)  # (B, D)


class TileProjection(nn.Module):
    """Tile features (B, N, F) → tile tokens (B, N, D)."""

    def __init__(self, tile_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.proj = _block(tile_dim, out_dim, dropout)
        self.out_dim = out_dim

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.proj(tiles)  # (B, N, D)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis where mask is True; padded positions get weight 0."""
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * mask


class GatedAttentionMIL(nn.Module):
    """Gated attention pooling (Ilse et al., 2018): a_i ∝ exp(wᵀ(tanh(V h_i) ⊙ σ(U h_i)))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.attention_v(tokens)) * torch.sigmoid(self.attention_u(tokens))  # (B, N, H)
        weights = masked_softmax(self.score(self.dropout(gate)).squeeze(-1), mask)  # (B, N)
        pooled = torch.einsum("bn,bnd->bd", weights, tokens)  # (B, D)
        return pooled, weights
