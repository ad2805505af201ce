"""Every registered model: shapes, masks, gradient flow; cross-attention really uses the image."""

import pytest
import torch

from mmbrca.config import Config, ModelConfig, load_config
from mmbrca.errors import UserError
from mmbrca.models import MODEL_BUILDERS, CrossAttentionFusion, build_model

N_GENES, TILE_DIM = 30, 48


def small(modality: str, **kwargs) -> ModelConfig:
    return ModelConfig(modality=modality, gene_hidden=16, embed_dim=16, tile_dim=TILE_DIM, fusion_dim=16, heads=4,
                       gene_tokens=3, dropout=0.0, attention_dropout=0.0, **kwargs)


def inputs(sizes=(5, 2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    genes = torch.randn(len(sizes), N_GENES, generator=g)
    tiles = torch.randn(len(sizes), max(sizes), TILE_DIM, generator=g)
    mask = torch.zeros(len(sizes), max(sizes), dtype=torch.bool)
    for row, n in enumerate(sizes):
        mask[row, :n] = True
    return genes, tiles * mask[..., None], mask


@pytest.mark.parametrize("modality", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes_masks_and_gradients(modality, bidirectional):
    torch.manual_seed(0)
    model = build_model(small(modality, bidirectional=bidirectional), n_genes=N_GENES)
    genes, tiles, mask = inputs()
    out = model(genes, tiles, mask)
    assert out.logits.shape == (3, 2) and torch.isfinite(out.logits).all()
    if modality == "gene":
        assert out.attention is None
    elif modality == "cross_attention":
        assert out.attention.shape == (3, 3, 7)  # (B, gene tokens, N)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 3))
        assert (out.attention[~mask[:, None, :].expand_as(out.attention)] == 0).all()
    else:
        assert out.attention.shape == (3, 7)
        torch.testing.assert_close(out.attention.sum(-1), torch.ones(3))
        assert (out.attention[~mask] == 0).all()
    out.logits.sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"

    # padding does not change a patient's output: patient 1 alone equals patient 1 in the padded batch
    model.eval()
    with torch.no_grad():
        batch = model(genes, tiles, mask).logits[1]
        alone = model(genes[1:2], tiles[1:2, :2], mask[1:2, :2]).logits[0]
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "concat", "cross_attention"])
def test_image_features_change_the_output(modality):
    torch.manual_seed(0)
    model = build_model(small(modality), n_genes=N_GENES).eval()
    genes, tiles, mask = inputs()
    with torch.no_grad():
        before = model(genes, tiles, mask).logits
        after = model(genes, tiles + torch.randn_like(tiles) * mask[..., None], mask).logits
    assert (before - after).abs().max() > 1e-3


def test_cross_attention_softmax_is_over_tiles_not_one_key():
    """The degenerate design (one key token) gives weight 1 everywhere; ours spreads over tiles."""
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(16, 16, 16, heads=4, gene_tokens=3, bidirectional=False, dropout=0.0,
                                  attention_dropout=0.0)
    _, attention = fusion(torch.randn(2, 16), torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool))
    assert attention.shape == (2, 3, 6) and (attention < 1).all() and (attention > 0).all()


def test_hyperparameters_validated_with_the_values_named():
    with pytest.raises(UserError, match="heads must divide model.fusion_dim, got heads=3, fusion_dim=16"):
        build_model(ModelConfig(fusion_dim=16, heads=3), n_genes=5)
    with pytest.raises(ValueError, match="heads=3, fusion_dim=16"):
        CrossAttentionFusion(8, 8, 16, 3, 2, False, 0.0, 0.0)
    with pytest.raises(UserError, match="model.modality must be one of"):
        build_model(ModelConfig(modality="transformer"), n_genes=5)


@pytest.mark.parametrize(("override", "message"), [
    ("model.heads=5", "heads must divide"), ("lr=0", "train.lr must be positive"),
    ("lr=-1e-3", "train.lr must be positive"), ("epochs=0", "train.epochs must be positive"),
    ("model.modality=rnn", "model.modality must be one of"), ("nope=1", "unknown config key 'nope'"),
    ("train.lr=fast", "train.lr: expected float, got 'fast'"), ("dropout", "--set expects key=value"),
])
def test_config_errors(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  heads: 8\n  fusion_dim: 64\ntrain:\n  lr: 1e-3\nexperiment: x\n")
    config = load_config(path, ["heads=2"])
    assert (config.model.heads, config.model.fusion_dim, config.train.lr, config.experiment) == (2, 64, 1e-3, "x")
    assert Config().flat()["model.fusion_dim"] == 128
