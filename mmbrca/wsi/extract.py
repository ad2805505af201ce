"""`mmbrca extract`: tile every slide of a cohort and cache ResNet-50 features, resumably.

DataLoader workers each take whole slides: open, mask tissue, plan tiles, read and decode them,
and send uint8 batches; the main process runs the encoder and writes one file per finished slide.
Cached slides are skipped before any worker or model starts; a slide that fails is recorded with
its reason and the others go on.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from mmbrca.errors import UserError
from mmbrca.io import atomic_path
from mmbrca.system import available_cores, resolve_device
from mmbrca.wsi.features import (TileEncoder, build_encoder, cache_key, feature_file_names, read_key,
                                 slide_identity, weights_identity, write_features)
from mmbrca.wsi.reader import SlideError, SlideReader
from mmbrca.wsi.tiling import plan_tiles
from mmbrca.wsi.tissue import TissueMasker

FEATURES_DIR = "features"


def default_workers() -> int:
    cores = available_cores()
    return max(1, min(8, cores - 1)) if torch.cuda.is_available() else max(1, min(4, cores // 2))


@dataclass(frozen=True)
class ExtractOptions:
    """Extraction parameters. Those in `content_params` decide the features and key the cache."""

    weights: str = "imagenet"
    mpp: float = 0.5
    tile_size: int = 224
    tiles_per_slide: int = 128
    min_tissue: float = 0.5
    assume_mpp: float | None = None
    seed: int = 0
    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = [("--mpp", self.mpp, self.mpp > 0), ("--tile-size", self.tile_size, self.tile_size >= 32),
                  ("--tiles-per-slide", self.tiles_per_slide, self.tiles_per_slide >= 1),
                  ("--min-tissue", self.min_tissue, 0 < self.min_tissue <= 1),
                  ("--assume-mpp", self.assume_mpp, self.assume_mpp is None or self.assume_mpp > 0),
                  ("--batch-size", self.batch_size, self.batch_size >= 1),
                  ("--workers", self.workers, self.workers >= 0)]
        for name, value, ok in checks:
            if not ok:
                raise UserError(f"{name}: invalid value {value!r}")

    def content_params(self, encoder_identity: str) -> dict:
        masker = asdict(TissueMasker())
        return {"encoder": encoder_identity, "mpp": self.mpp, "tile_size": self.tile_size,
                "tiles_per_slide": self.tiles_per_slide, "min_tissue": self.min_tissue,
                "assume_mpp": self.assume_mpp, "seed": self.seed, "tissue_masker": masker}

    @classmethod
    def from_content_params(cls, params: dict, **overrides) -> ExtractOptions:
        """The options that reproduce features with `params` (as `content_params` wrote them)."""
        return cls(weights="none", mpp=params["mpp"], tile_size=params["tile_size"],
                   tiles_per_slide=params["tiles_per_slide"], min_tissue=params["min_tissue"],
                   assume_mpp=params["assume_mpp"], seed=params["seed"], **overrides)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device, option="--device")


@dataclass
class ExtractResult:
    done: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tiles: int = 0
    seconds: float = 0.0
    encoder_loaded: bool = False  # False when every slide came from the cache

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else 0.0


class _SlideTiles(IterableDataset):
    """Yields, per slide, a 'plan' item, then uint8 tile batches; or an 'error' item. Workers split slides."""

    def __init__(self, jobs: list[tuple[int, str]], options: ExtractOptions) -> None:
        self.jobs, self.options = jobs, options

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        jobs = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for index, path in jobs:
            try:
                yield from self._slide(index, path)
            except SlideError as exc:
                yield {"slide": index, "error": str(exc)}
            except Exception as exc:  # a broken file can make any decoder raise
                yield {"slide": index, "error": f"{type(exc).__name__}: {exc}".splitlines()[0]}

    def _slide(self, index: int, path: str) -> Iterator[dict]:
        opts = self.options
        with SlideReader(path, assume_mpp=opts.assume_mpp) as reader:
            plan = plan_tiles(reader, target_mpp=opts.mpp, tile_size=opts.tile_size, max_tiles=opts.tiles_per_slide,
                              min_tissue=opts.min_tissue, seed=opts.seed)
            yield {"slide": index, "plan": plan, "mpp": reader.mpp, "mpp_source": reader.mpp_source}
            for start in range(0, len(plan.coords), opts.batch_size):
                coords = plan.coords[start:start + opts.batch_size]
                tiles = np.stack([reader.read_tile(x, y, plan.geometry) for x, y in coords])  # (B, H, W, 3)
                yield {"slide": index, "start": start, "images": torch.from_numpy(tiles).permute(0, 3, 1, 2)}


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode; the main process owns the cores for the model


def _clean_stale_temp_files(directory: Path) -> None:
    """Temporary files of a run that was killed half-way are never valid: remove them."""
    for stale in directory.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def extract_slides(slide_paths: list[str], out_dir: str | os.PathLike, options: ExtractOptions, *,
                   progress: bool = True, encoder: tuple[torch.nn.Module, str] | None = None) -> ExtractResult:
    """Extract features for `slide_paths` into `out_dir`, skipping slides already cached.

    `encoder` is an already built (model, identity) to use instead of `options.weights` (a
    registered model carries its own).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_temp_files(out_dir)
    result = ExtractResult()
    started = time.perf_counter()
    names = feature_file_names(slide_paths)
    params = options.content_params(encoder[1] if encoder else weights_identity(options.weights))
    keys, jobs = {}, []
    for index, path in enumerate(slide_paths):
        try:
            keys[path] = cache_key(slide_identity(path), params)
        except OSError as exc:
            result.failed[path] = f"cannot stat slide: {exc.strerror or exc}"
            continue
        if read_key(out_dir / names[path]) == keys[path]:
            result.cached.append(path)
        else:
            jobs.append((index, path))
    if jobs:  # the model is built only when some slide needs it
        _run_jobs(jobs, slide_paths, names, keys, params, out_dir, options, result, progress=progress,
                  model=encoder[0] if encoder else None)
    _write_failures(out_dir / "failures.csv", result.failed)
    source = None if encoder or options.weights in ("none", "imagenet") else str(Path(options.weights).resolve())
    _write_manifest(out_dir / "manifest.json", params, {p: names[p] for p in result.done + result.cached}, source)
    result.seconds = time.perf_counter() - started
    return result


class _Batcher:
    """Gathers tiles from per-slide chunks into full model batches that may span slides."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.chunks: list[tuple[int, int, torch.Tensor]] = []  # (slide, start, images (b, 3, H, W))
        self.buffered = 0

    def add(self, slide: int, start: int, images: torch.Tensor) -> None:
        self.chunks.append((slide, start, images))
        self.buffered += len(images)

    def drop(self, slide: int) -> None:
        self.chunks = [c for c in self.chunks if c[0] != slide]
        self.buffered = sum(len(c[2]) for c in self.chunks)

    def take(self, flush: bool = False) -> tuple[torch.Tensor, list[tuple[int, int, int]]] | None:
        """A batch (B, 3, H, W) and where its rows go: (slide, start, count); None if not full yet."""
        if self.buffered == 0 or (self.buffered < self.batch_size and not flush):
            return None
        parts, routes, wanted = [], [], self.batch_size
        while wanted and self.chunks:
            slide, start, images = self.chunks[0]
            n = min(wanted, len(images))
            parts.append(images[:n])
            routes.append((slide, start, n))
            if n == len(images):
                self.chunks.pop(0)
            else:
                self.chunks[0] = (slide, start + n, images[n:])
            wanted -= n
        self.buffered -= self.batch_size - wanted
        return torch.cat(parts), routes


def _run_jobs(jobs, slide_paths, names, keys, params, out_dir, options, result, *, progress: bool,
              model: torch.nn.Module | None) -> None:
    device = options.torch_device()
    loader = DataLoader(_SlideTiles(jobs, options), batch_size=None, num_workers=options.workers,
                        worker_init_fn=_worker_init if options.workers else None,
                        pin_memory=device.type == "cuda", prefetch_factor=4 if options.workers else None)
    items = iter(loader)  # workers start planning and reading while the model is built
    encoder = TileEncoder(model if model is not None else build_encoder(options.weights)[0], device)
    result.encoder_loaded = True
    pending: dict[int, dict] = {}
    batcher = _Batcher(options.batch_size)
    slide_bar = tqdm(total=len(jobs), desc="slides", unit="slide", disable=not progress, position=0)
    tile_bar = tqdm(total=0, desc="tiles", unit="tile", disable=not progress, position=1, leave=False)

    def encode(flush: bool = False) -> None:
        while (taken := batcher.take(flush)) is not None:
            images, routes = taken
            features = encoder(images)  # (B, 2048)
            offset = 0
            for slide, start, count in routes:
                state = pending[slide]
                state["features"][start:start + count] = features[offset:offset + count]
                state["filled"] += count
                offset += count
                if state["filled"] == len(state["plan"].coords):
                    path = slide_paths[slide]
                    _finish_slide(out_dir / names[path], path, keys[path], params, pending.pop(slide))
                    result.done.append(path)
                    result.tiles += len(state["plan"].coords)
                    slide_bar.update()
            tile_bar.update(len(images))

    for item in items:
        index = item["slide"]
        if "error" in item:
            pending.pop(index, None)
            batcher.drop(index)
            result.failed[slide_paths[index]] = item["error"]
            slide_bar.update()
        elif "plan" in item:
            plan = item["plan"]
            pending[index] = {"plan": plan, "mpp": item["mpp"], "mpp_source": item["mpp_source"],
                              "features": np.zeros((len(plan.coords), 2048), np.float16), "filled": 0}
            tile_bar.total += len(plan.coords)
            tile_bar.refresh()
        else:
            batcher.add(index, item["start"], item["images"])
            encode()
    encode(flush=True)
    tile_bar.close()
    slide_bar.close()


def _finish_slide(file: Path, slide: str, key: str, params: dict, state: dict) -> None:
    plan = state["plan"]
    geometry = plan.geometry
    attrs = {"key": key, "params": params, "slide": slide, "tile_level0_size": geometry.level0_size,
             "level": geometry.level, "level_mpp": geometry.level_mpp, "read_size": geometry.read_size,
             "mpp": state["mpp"], "mpp_source": state["mpp_source"], "n_candidates": plan.n_candidates}
    write_features(file, state["features"], plan.coords, plan.tissue_fraction, attrs)


def _write_failures(path: Path, failed: dict[str, str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide", "reason"])
        writer.writerows(sorted(failed.items()))


def _write_manifest(path: Path, params: dict, files: dict[str, str], encoder_source: str | None) -> None:
    """`encoder_source`: where a local state dict was read from, so a registered model can carry it."""
    manifest = {"params": params, "encoder_source": encoder_source, "slides": dict(sorted(files.items()))}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def extraction_settings(cohort_dir: str | os.PathLike) -> dict:
    """The settings that made a cohort's features (`params`, `encoder_source`), for models to carry."""
    path = Path(cohort_dir) / FEATURES_DIR / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: no feature manifest; run `mmbrca extract {cohort_dir}`")
    manifest = json.loads(path.read_text())
    return {"params": manifest["params"], "encoder_source": manifest.get("encoder_source")}


def extract_cohort(cohort_dir: str | os.PathLike, options: ExtractOptions, *, experiment: str = "mmbrca",
                   progress: bool = True, use_project_run: bool = True) -> ExtractResult:
    """Extract features for every slide of a cohort into COHORT/features, tracked as an MLflow run."""
    import mlflow

    from mmbrca.data.cohort import load_cohort
    from mmbrca.tracking import start_run

    cohort = load_cohort(cohort_dir)
    slides = sorted({str(p) for paths in cohort.table["slide_paths"] for p in paths})
    if not slides:
        raise UserError(f"{cohort.path}: the cohort has no slides (build it with `mmbrca cohort --slides DIR`)")
    out_dir = cohort.path / FEATURES_DIR
    with start_run(experiment, f"extract/{cohort.path.resolve().name}",
                   tags={"mmbrca.step": "extract", "cohort_fingerprint": cohort.fingerprint,
                         "cohort_path": str(cohort.path.resolve())}, use_project_run=use_project_run):
        mlflow.log_params({**{k: v for k, v in asdict(options).items()}, "device": str(options.torch_device()),
                           "torch_threads": torch.get_num_threads()})
        result = extract_slides(slides, out_dir, options, progress=progress)
        mlflow.log_metrics({"slides_total": len(slides), "slides_done": len(result.done),
                            "slides_cached": len(result.cached), "slides_failed": len(result.failed),
                            "tiles_encoded": result.tiles, "seconds": result.seconds,
                            "tiles_per_second": result.tiles_per_second})
        mlflow.log_artifact(str(out_dir / "failures.csv"))
        mlflow.log_artifact(str(out_dir / "manifest.json"))
    return result
