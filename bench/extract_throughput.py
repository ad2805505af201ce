"""Tiles per second of the whole extraction pipeline versus a bare ResNet-50 forward pass.

    python bench/extract_throughput.py [--slides DIR] [--batch-size 32] [--threads N] [--workers N]

Measured side by side in one run, with the same batch size, threads, device and channels-last
inference: (a) ResNet-50 on random tensors, (b) `extract_slides` on demo slides (open, tissue
mask, tile reading and decoding in DataLoader workers, encoding, writing the cache). (a) is run
before and after (b) and averaged, so drift on a shared machine affects both. Prints b/a.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mmbrca.data.demo import DemoConfig, write_demo
from mmbrca.wsi.extract import ExtractOptions, extract_slides
from mmbrca.wsi.features import TileEncoder, build_encoder


def bare_forward(batch_size: int, n_tiles: int, tile_size: int, device: torch.device) -> float:
    """Tiles/s of the encoder alone on random uint8 batches (includes normalisation, as the pipeline)."""
    model, _ = build_encoder("none")
    encoder = TileEncoder(model, device)
    batch = torch.randint(0, 256, (batch_size, 3, tile_size, tile_size), dtype=torch.uint8)
    encoder(batch)  # warm-up
    started = time.perf_counter()
    done = 0
    while done < n_tiles:
        encoder(batch)
        done += batch_size
    return done / (time.perf_counter() - started)


def pipeline(slides: list[str], options: ExtractOptions) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        result = extract_slides(slides, out, options, progress=False)
    if result.failed:
        raise SystemExit(f"slides failed: {result.failed}")
    return result.tiles / result.seconds, result.tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=Path, help="directory of slides [default: a fresh demo]")
    parser.add_argument("--n-slides", type=int, default=12)
    parser.add_argument("--tiles-per-slide", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=ExtractOptions().workers)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    options = ExtractOptions(weights="none", tiles_per_slide=args.tiles_per_slide, batch_size=args.batch_size,
                             workers=args.workers, device=args.device)
    device = options.torch_device()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.slides or write_demo(Path(tmp) / "demo", DemoConfig(patients=20, sites=4, genes=100),
                                         progress=False) / "slides"
        slides = sorted(str(p) for p in root.glob("*.svs"))[: args.n_slides]
        n_tiles = len(slides) * args.tiles_per_slide
        before = bare_forward(args.batch_size, n_tiles // 2, options.tile_size, device)
        whole, tiles = pipeline(slides, options)
        after = bare_forward(args.batch_size, n_tiles // 2, options.tile_size, device)
    bare = (before + after) / 2
    print(f"device={device} threads={args.threads} workers={args.workers} batch={args.batch_size} "
          f"slides={len(slides)} tiles={tiles}")
    print(f"(a) bare ResNet-50 forward: {bare:.1f} tiles/s (before {before:.1f}, after {after:.1f})")
    print(f"(b) whole extraction pipeline: {whole:.1f} tiles/s")
    print(f"ratio b/a = {whole / bare:.3f}")


if __name__ == "__main__":
    main()
