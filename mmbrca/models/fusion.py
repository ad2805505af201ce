"""Cross-attention fusion: gene tokens query the tile tokens (and optionally tiles query genes)."""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention with a residual and a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=attention_dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def forward(self, query: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T, D) attends over context (B, N, D) where context_mask (B, N) is True."""
        kv = self.norm_kv(context)
        attended, weights = self.attention(self.norm_q(query), kv, kv, key_padding_mask=~context_mask,
                                           need_weights=True, average_attn_weights=True)  # (B, T, D), (B, T, N)
        query = query + attended
        return query + self.ffn(query), weights


class CrossAttentionFusion(nn.Module):
    """Expression embedding → `gene_tokens` tokens that attend over the tile tokens.

    Several query tokens attend over many tile tokens, so the softmax is over tiles and image
    features reach the output (one key token would make every weight 1 and the image irrelevant).
    With `bidirectional`, tiles first attend to the gene tokens. The gene tokens are mean-pooled.
    """

    def __init__(self, gene_dim: int, image_dim: int, fusion_dim: int, heads: int, gene_tokens: int,
                 bidirectional: bool, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        if fusion_dim % heads:
            raise ValueError(f"heads must divide fusion_dim, got {heads=}, {fusion_dim=}")
        self.gene_tokens = gene_tokens
        self.fusion_dim = fusion_dim
        self.to_tokens = nn.Linear(gene_dim, gene_tokens * fusion_dim)
        self.token_embedding = nn.Parameter(torch.randn(1, gene_tokens, fusion_dim) * 0.02)
        self.tile_in = nn.Linear(image_dim, fusion_dim)
        self.tiles_to_genes = (CrossAttentionBlock(fusion_dim, heads, dropout, attention_dropout)
                               if bidirectional else None)
        self.genes_to_tiles = CrossAttentionBlock(fusion_dim, heads, dropout, attention_dropout)
        self.norm = nn.LayerNorm(fusion_dim)
        self.out_dim = fusion_dim

    def forward(self, gene_embedding: torch.Tensor, tiles: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """gene_embedding (B, Dg), tiles (B, N, Di), mask (B, N) → fused (B, D), attention (B, T, N)."""
        batch = gene_embedding.shape[0]
        tokens = self.to_tokens(gene_embedding).view(batch, self.gene_tokens, self.fusion_dim)  # (B, T, D)
        tokens = tokens + self.token_embedding
        tile_tokens = self.tile_in(tiles)  # (B, N, D)
        if self.tiles_to_genes is not None:
            all_tokens = torch.ones(batch, self.gene_tokens, dtype=torch.bool, device=mask.device)
            tile_tokens, _ = self.tiles_to_genes(tile_tokens, tokens, all_tokens)  # (B, N, D)
        tokens, attention = self.genes_to_tiles(tokens, tile_tokens, mask)  # (B, T, D), (B, T, N)
        return self.norm(tokens.mean(dim=1)), attention  # (B, D)
