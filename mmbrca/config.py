"""Typed configuration: one object passed down, logged once to MLflow.

A config is built from defaults, then a YAML file, then `key=value` overrides. Keys are dotted
(`model.heads=8`); a bare field name (`heads=8`) works when only one section has it. Values are
parsed as YAML scalars and checked against the field's type; errors name the key and the value.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

import yaml

from mmbrca.errors import UserError
from mmbrca.io import read_yaml_mapping

MODALITIES = ("gene", "image", "concat", "cross_attention")


@dataclass
class ModelConfig:
    modality: str = "cross_attention"
    gene_hidden: int = 256  # width of the gene MLP's hidden layers
    gene_layers: int = 2  # Linear → LayerNorm → GELU → Dropout blocks
    embed_dim: int = 128  # width of the gene and image embeddings
    tile_dim: int = 2048  # input feature size (ResNet-50)
    fusion_dim: int = 128  # width of the cross-attention
    heads: int = 4
    gene_tokens: int = 4  # tokens the expression embedding is split into
    bidirectional: bool = False  # tiles also attend to the gene tokens
    dropout: float = 0.25
    attention_dropout: float = 0.1


@dataclass
class PreprocessConfig:
    log_transform: str = "auto"  # auto | yes | no ; auto = log2(x+1) when values look like raw counts/RSEM
    top_genes: int = 1000  # highest-variance genes on the training patients
    standardize: bool = True


@dataclass
class TrainConfig:
    fold: int = 0
    epochs: int = 40
    lr: float = 5e-4
    weight_decay: float = 1e-2
    batch_size: int = 8
    bag_size: int = 64  # tiles sampled per patient and epoch (all tiles at evaluation)
    val_fraction: float = 0.2  # inner validation split of the training folds
    patience: int = 8  # epochs without val improvement before stopping
    monitor: str = "val_loss"  # val_loss (min) or val_pr_auc (max)
    warmup_epochs: int = 2
    grad_clip: float = 1.0
    class_weighted: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: str = "mmbrca"

    def validate(self) -> Config:
        m, t, p = self.model, self.train, self.preprocess
        rules = [
            (m.modality in MODALITIES, f"model.modality must be one of {', '.join(MODALITIES)}, got {m.modality!r}"),
            (m.heads >= 1 and m.fusion_dim % m.heads == 0,
             f"model.heads must divide model.fusion_dim, got heads={m.heads}, fusion_dim={m.fusion_dim}"),
            (m.gene_tokens >= 1, f"model.gene_tokens must be at least 1, got {m.gene_tokens}"),
            (0 <= m.dropout < 1 and 0 <= m.attention_dropout < 1,
             f"model.dropout and model.attention_dropout must be in [0, 1), got {m.dropout}, {m.attention_dropout}"),
            (min(m.gene_hidden, m.embed_dim, m.fusion_dim, m.tile_dim) >= 1 and m.gene_layers >= 1,
             "model widths and model.gene_layers must be positive"),
            (p.log_transform in ("auto", "yes", "no"),
             f"preprocess.log_transform must be auto, yes or no, got {p.log_transform!r}"),
            (p.top_genes >= 1, f"preprocess.top_genes must be positive, got {p.top_genes}"),
            (t.lr > 0, f"train.lr must be positive, got {t.lr}"),
            (t.epochs >= 1, f"train.epochs must be positive, got {t.epochs}"),
            (t.batch_size >= 1 and t.bag_size >= 1, f"train.batch_size and train.bag_size must be positive, "
                                                    f"got {t.batch_size}, {t.bag_size}"),
            (0 < t.val_fraction < 0.5, f"train.val_fraction must be in (0, 0.5), got {t.val_fraction}"),
            (t.patience >= 1, f"train.patience must be positive, got {t.patience}"),
            (t.monitor in ("val_loss", "val_pr_auc"), f"train.monitor must be val_loss or val_pr_auc, got {t.monitor!r}"),
            (t.weight_decay >= 0 and t.grad_clip > 0 and t.warmup_epochs >= 0,
             "train.weight_decay and train.warmup_epochs must be ≥ 0 and train.grad_clip > 0"),
        ]
        for ok, message in rules:
            if not ok:
                raise UserError(message)
        return self

    def flat(self) -> dict[str, object]:
        """{'model.heads': 4, ...}: every hyperparameter, for MLflow params."""
        out: dict[str, object] = {"experiment": self.experiment}
        for section in ("model", "preprocess", "train"):
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


_SECTIONS = {"model": ModelConfig, "preprocess": PreprocessConfig, "train": TrainConfig}


def _coerce(key: str, raw: object, kind: type) -> object:
    if isinstance(raw, str):
        try:
            raw = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            pass
    if isinstance(raw, str) and kind in (int, float):
        try:  # YAML 1.1 reads 1e-3 as a string
            raw = float(raw)
        except ValueError:
            pass
    if kind is bool:
        if isinstance(raw, bool):
            return raw
    elif kind is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
    elif kind is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
    elif kind is str:
        return str(raw)
    raise UserError(f"{key}: expected {kind.__name__}, got {raw!r}")


def _resolve_key(key: str) -> tuple[str | None, str]:
    if key == "experiment":
        return None, key
    if "." in key:
        section, name = key.split(".", 1)
        if section in _SECTIONS and name in {f.name for f in dataclasses.fields(_SECTIONS[section])}:
            return section, name
        raise UserError(f"unknown config key {key!r}")
    owners = [s for s, cls in _SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if len(owners) != 1:
        raise UserError(f"unknown config key {key!r}" if not owners else
                        f"ambiguous config key {key!r}: use one of {', '.join(f'{o}.{key}' for o in owners)}")
    return owners[0], key


def set_value(config: Config, key: str, raw: object) -> None:
    section, name = _resolve_key(key)
    if section is None:
        config.experiment = str(raw)
        return
    target = getattr(config, section)
    kind = typing.get_type_hints(type(target))[name]
    setattr(target, name, _coerce(f"{section}.{name}", raw, kind))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                validate: bool = True) -> Config:
    """Defaults ← YAML file ← `key=value` overrides, validated (names and types always)."""
    config = Config()
    if path is not None:
        _, data = read_yaml_mapping(path, what="config")
        for key, value in data.items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    set_value(config, f"{key}.{sub}", sub_value)
            else:
                set_value(config, key, value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set expects key=value, got {item!r}")
        set_value(config, key.strip(), value)
    return config.validate() if validate else config
