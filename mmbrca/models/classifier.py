"""The classifier: encoders and a fusion module chosen by `modality`, then a linear head.

Named builders, one per modality, are registered in MODEL_BUILDERS; `build_model(config, n_genes)`
dispatches on `config.modality`. Every model takes (genes, tiles, mask) and returns ModelOutput.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mmbrca.config import ModelConfig
from mmbrca.errors import UserError
from mmbrca.models.encoders import GatedAttentionMIL, GeneEncoder, TileProjection
from mmbrca.models.fusion import CrossAttentionFusion

N_CLASSES = 2


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, C)
    attention: torch.Tensor | None  # (B, T, N) gene tokens × tiles, (B, N) MIL weights, or None


class Classifier(nn.Module):
    """Receives its parts; uses the gene encoder, the image encoder (projection + MIL), or both."""

    def __init__(self, *, gene_encoder: GeneEncoder | None = None, tile_projection: TileProjection | None = None,
                 mil: GatedAttentionMIL | None = None, fusion: CrossAttentionFusion | None = None,
                 head_dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.gene_encoder, self.tile_projection, self.mil, self.fusion = gene_encoder, tile_projection, mil, fusion
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_dim, n_classes))

    @property
    def uses_genes(self) -> bool:
        return self.gene_encoder is not None

    @property
    def uses_tiles(self) -> bool:
        return self.tile_projection is not None

    def forward_features(self, genes: torch.Tensor | None, tiles: torch.Tensor | None,
                         mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        gene_embedding = self.gene_encoder(genes) if self.uses_genes else None  # (B, Dg)
        if not self.uses_tiles:
            return gene_embedding, None
        tile_tokens = self.tile_projection(tiles)  # (B, N, Di)
        if self.fusion is not None:
            return self.fusion(gene_embedding, tile_tokens, mask)  # (B, D), (B, T, N)
        pooled, weights = self.mil(tile_tokens, mask)  # (B, Di), (B, N)
        if gene_embedding is not None:
            return torch.cat([gene_embedding, pooled], dim=-1), weights  # (B, Dg + Di)
        return pooled, weights

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # (B, C)

    def forward(self, genes: torch.Tensor | None = None, tiles: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> ModelOutput:
        features, attention = self.forward_features(genes, tiles, mask)
        return ModelOutput(logits=self.forward_head(features), attention=attention)


def gene_model(cfg: ModelConfig, n_genes: int, n_classes: int) -> Classifier:
    genes = GeneEncoder(n_genes, cfg.gene_hidden, cfg.gene_layers, cfg.embed_dim, cfg.dropout)
    return Classifier(gene_encoder=genes, head_dim=genes.out_dim, n_classes=n_classes, dropout=cfg.dropout)


def image_model(cfg: ModelConfig, n_genes: int, n_classes: int) -> Classifier:
    projection = TileProjection(cfg.tile_dim, cfg.embed_dim, cfg.dropout)
    mil = GatedAttentionMIL(cfg.embed_dim, cfg.embed_dim, cfg.attention_dropout)
    return Classifier(tile_projection=projection, mil=mil, head_dim=cfg.embed_dim, n_classes=n_classes,
                      dropout=cfg.dropout)


def concat_model(cfg: ModelConfig, n_genes: int, n_classes: int) -> Classifier:
    genes = GeneEncoder(n_genes, cfg.gene_hidden, cfg.gene_layers, cfg.embed_dim, cfg.dropout)
    projection = TileProjection(cfg.tile_dim, cfg.embed_dim, cfg.dropout)
    mil = GatedAttentionMIL(cfg.embed_dim, cfg.embed_dim, cfg.attention_dropout)
    return Classifier(gene_encoder=genes, tile_projection=projection, mil=mil, head_dim=2 * cfg.embed_dim,
                      n_classes=n_classes, dropout=cfg.dropout)


def cross_attention_model(cfg: ModelConfig, n_genes: int, n_classes: int) -> Classifier:
    genes = GeneEncoder(n_genes, cfg.gene_hidden, cfg.gene_layers, cfg.embed_dim, cfg.dropout)
    projection = TileProjection(cfg.tile_dim, cfg.embed_dim, cfg.dropout)
    fusion = CrossAttentionFusion(cfg.embed_dim, cfg.embed_dim, cfg.fusion_dim, cfg.heads, cfg.gene_tokens,
                                  cfg.bidirectional, cfg.dropout, cfg.attention_dropout)
    return Classifier(gene_encoder=genes, tile_projection=projection, fusion=fusion, head_dim=fusion.out_dim,
                      n_classes=n_classes, dropout=cfg.dropout)


MODEL_BUILDERS: dict[str, Callable[[ModelConfig, int, int], Classifier]] = {
    "gene": gene_model, "image": image_model, "concat": concat_model, "cross_attention": cross_attention_model,
}


def build_model(cfg: ModelConfig, n_genes: int, n_classes: int = N_CLASSES) -> Classifier:
    if cfg.modality not in MODEL_BUILDERS:
        raise UserError(f"model.modality must be one of {', '.join(MODEL_BUILDERS)}, got {cfg.modality!r}")
    if cfg.fusion_dim % cfg.heads:
        raise UserError(f"model.heads must divide model.fusion_dim, got heads={cfg.heads}, fusion_dim={cfg.fusion_dim}")
    return MODEL_BUILDERS[cfg.modality](cfg, n_genes, n_classes)
