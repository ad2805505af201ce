"""The tile encoder (ResNet-50 trunk → 2048-d) and the per-slide feature cache.

Cache layout, one HDF5 file per slide (the layout CLAM uses, readable lazily with h5py):

    COHORT/features/<slide file stem>.h5
        features         (N, 2048) float16
        coords           (N, 2)    int64   level-0 (x, y) of each tile's top-left corner
        tissue_fraction  (N,)      float32
        attrs: key (cache key), params (JSON), slide, tile_level0_size, level, level_mpp, mpp, mpp_source
    COHORT/features/manifest.json   the parameters of the set and slide → file
    COHORT/features/failures.csv    slide, reason

The cache key hashes the slide's identity (resolved path, size, mtime) and every parameter that
changes the features; a file whose key differs is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50

from mmbrca.errors import UserError
from mmbrca.io import atomic_path, sha256_file

FEATURE_DIM = 2048
FEATURE_FORMAT_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0


def imagenet_cache_path() -> Path:
    """Where torchvision keeps the IMAGENET1K_V2 ResNet-50 weights (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(ResNet50_Weights.IMAGENET1K_V2.url).name


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--weights {path}: file not found") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise UserError(f"--weights {path}: cannot load a state dict ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}


def weights_identity(weights: str) -> str:
    """A string naming the encoder weights, for the cache key, without loading them."""
    if weights == "none":
        return f"random-init-seed{RANDOM_INIT_SEED}"
    if weights == "imagenet":
        return "torchvision:IMAGENET1K_V2"
    if not Path(weights).is_file():
        raise UserError(f"--weights {weights}: file not found (use imagenet, none or the path of a state dict)")
    return f"sha256:{sha256_file(weights)[:16]}"


def build_encoder(weights: str) -> tuple[nn.Module, str]:
    """ResNet-50 without its classifier, in eval mode, channels-last; and a string naming its weights.

    weights: 'imagenet' (torchvision IMAGENET1K_V2 from the torch cache, downloaded if possible),
    'none' (random initialisation from a fixed seed, so it is the same network every time),
    or the path of a local state dict.
    """
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = resnet50(weights=None)
    elif weights == "imagenet":
        try:
            model = resnet50(weights=ResNet50_Weights.IMAGENET1K_V2, progress=False)
        except Exception as exc:  # URLError, OSError, RuntimeError ... when offline
            raise UserError(
                f"--weights imagenet: ResNet-50 IMAGENET1K_V2 weights are not in the torch cache "
                f"({imagenet_cache_path()}) and cannot be downloaded ({type(exc).__name__}); copy the file there, "
                "or use --weights PATH (a local state dict) or --weights none") from None
    else:
        model = _resnet50_from_state_dict(Path(weights))
    model.fc = nn.Identity()
    return model.eval().to(memory_format=torch.channels_last), weights_identity(weights)


def _resnet50_from_state_dict(path: Path) -> nn.Module:
    state = _load_state_dict(path)
    model = resnet50(weights=None)
    model.fc = nn.Identity()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise UserError(f"--weights {path}: not a ResNet-50 state dict ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        culprit = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"--weights {path}: not a ResNet-50 state dict ({culprit}, "
                        f"{len(missing)} missing, {len(unexpected)} unexpected keys)")
    return model


def encoder_for_identity(identity: str, source: str | None = None) -> nn.Module:
    """Rebuild the encoder that produced features with `identity` (as `weights_identity` names it).

    A local state dict is found again through `source`, its path at extraction time, and must
    still hash to the same identity.
    """
    if identity == weights_identity("none"):
        return build_encoder("none")[0]
    if identity == weights_identity("imagenet"):
        return build_encoder("imagenet")[0]
    if source and Path(source).is_file() and weights_identity(source) == identity:
        return build_encoder(source)[0]
    raise UserError(f"encoder weights {identity}: the state dict used for extraction ({source or 'path unknown'}) "
                    "is missing or has changed; the model cannot carry the encoder it was trained with")


def load_encoder(path: str | os.PathLike) -> nn.Module:
    """An encoder saved with `torch.save(model.state_dict())` by `encoder_for_identity`'s caller."""
    model = _resnet50_from_state_dict(Path(path))
    return model.eval().to(memory_format=torch.channels_last)


class TileEncoder:
    """Encodes uint8 tile batches (B, 3, H, W) into float16 features (B, 2048) on a device."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).float()  # (B, 3, H, W)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            features = self.model(x)  # (B, 2048)
        return features.float().cpu().numpy().astype(np.float16)


def slide_identity(path: str | os.PathLike) -> dict:
    """What makes a slide file 'the same' for the cache: resolved path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(identity: dict, params: dict) -> str:
    blob = json.dumps({"slide": identity, "params": params, "format": FEATURE_FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def feature_file_names(slide_paths: list[str]) -> dict[str, str]:
    """slide path → file name under features/: the slide's stem, made unique where two collide."""
    stems: dict[str, list[str]] = {}
    for path in slide_paths:
        stems.setdefault(Path(path).stem, []).append(path)
    names = {}
    for stem, paths in stems.items():
        for path in paths:
            suffix = "" if len(paths) == 1 else "-" + hashlib.sha1(path.encode()).hexdigest()[:8]
            names[path] = f"{stem}{suffix}.h5"
    return names


def read_key(path: Path) -> str | None:
    """The cache key stored in a feature file, or None if absent or unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            return str(h5.attrs["key"])
    except (OSError, KeyError):
        return None


@dataclass(frozen=True)
class SlideFeatures:
    features: np.ndarray  # (N, 2048) float16
    coords: np.ndarray  # (N, 2) int64
    tissue_fraction: np.ndarray  # (N,)
    attrs: dict


def write_features(path: Path, features: np.ndarray, coords: np.ndarray, tissue_fraction: np.ndarray,
                   attrs: dict) -> None:
    """Write one slide's feature file atomically: it appears complete or not at all."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("features", data=features.astype(np.float16), chunks=(min(len(features), 256), FEATURE_DIM))
            h5.create_dataset("coords", data=coords.astype(np.int64))
            h5.create_dataset("tissue_fraction", data=tissue_fraction.astype(np.float32))
            for key, value in attrs.items():
                h5.attrs[key] = json.dumps(value) if isinstance(value, dict) else value


def read_features(path: str | os.PathLike, indices: np.ndarray | None = None) -> SlideFeatures:
    """Load one slide's features (all, or the rows in `indices`) without reading the rest of the file."""
    with h5py.File(path, "r") as h5:
        rows = slice(None) if indices is None else np.sort(np.asarray(indices))
        attrs = {k: (json.loads(v) if k == "params" else v) for k, v in h5.attrs.items()}
        return SlideFeatures(features=h5["features"][rows], coords=h5["coords"][rows],
                             tissue_fraction=h5["tissue_fraction"][rows], attrs=attrs)


def count_tiles(path: str | os.PathLike) -> int:
    with h5py.File(path, "r") as h5:
        return int(h5["features"].shape[0])
