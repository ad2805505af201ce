"""Models: gene MLP, attention-MIL image encoder, late fusion and cross-attention fusion."""

from mmbrca.models.classifier import MODEL_BUILDERS, Classifier, ModelOutput, build_model
from mmbrca.models.encoders import GatedAttentionMIL, GeneEncoder, TileProjection
from mmbrca.models.fusion import CrossAttentionFusion

__all__ = ["MODEL_BUILDERS", "Classifier", "CrossAttentionFusion", "GatedAttentionMIL", "GeneEncoder",
           "ModelOutput", "TileProjection", "build_model"]
