"""What prediction from raw slides costs beyond tile extraction itself.

    python bench/predict_throughput.py [--cohort COHORT] [--patients 24] [--chunk-size 8]

A one-fold cross-attention model (2 epochs) is logged as a self-contained ensemble; then, side by
side on the same patients' slides: (a) bare extraction with the model's encoder and settings,
(b) `mmbrca predict`'s path (pyfunc predict from raw slides + expression, `--chunk-size` patients
a call, as the CLI does), (c) the same in one call; after a warm-up, interleaved, best of two. Prints seconds, tiles/s and
the ratios b/a and c/a; everything beyond extraction (schema checks, expression, fold models) is
in the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow

from _workspace import workspace  # bench/ is on sys.path when a benchmark runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cohort", type=Path, help="a cohort with features [default: a fresh demo]")
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--chunk-size", type=int, default=8)
    args = parser.parse_args()

    from mmbrca.config import load_config
    from mmbrca.predict import cohort_input, predict_in_chunks
    from mmbrca.registry import log_ensemble
    from mmbrca.train import train_fold
    from mmbrca.wsi.extract import ExtractOptions, extract_slides

    with workspace(args.cohort) as (tmp, cohort, _):
        config = load_config(None, ["fold=0", "epochs=2", "model.modality=cross_attention"])
        run_id = train_fold(cohort, config, progress=False).run_id
        info, settings, _ = log_ensemble([run_id], run_id=run_id)
        model = mlflow.pyfunc.load_model(info.model_uri)
        rows = cohort_input(cohort, settings.genes, use_features=False, extraction=None)
        rows = rows[rows["slide_path"] != ""].head(args.patients).drop(columns=["true_class", "fold"])
        slides = [p for paths in rows["slide_path"] for p in paths.split(";")]
        params = settings.extraction["params"]
        options = ExtractOptions.from_content_params(params)
        encoder = model.unwrap_python_model().encoder

        extract_slides(slides[:2], tmp / "warm-up", options, progress=False, encoder=(encoder, params["encoder"]))
        runs = {
            "a": lambda out: extract_slides(slides, out, options, progress=False, encoder=(encoder, params["encoder"])),
            "b": lambda _: predict_in_chunks(model, rows, params=None, chunk_size=args.chunk_size, progress=False),
            "c": lambda _: predict_in_chunks(model, rows, params=None, chunk_size=len(rows), progress=False),
        }
        seconds: dict[str, float] = {}
        results = {}
        for repeat in range(2):  # interleaved, best of two: the machine is shared
            for key, run in runs.items():
                started = time.perf_counter()
                results[key] = run(tmp / f"bare-{repeat}")
                seconds[key] = min(seconds.get(key, float("inf")), time.perf_counter() - started)
        extracted, chunked = results["a"], results["b"]
        bare, by_chunk, one_call = seconds["a"], seconds["b"], seconds["c"]

    tiles = extracted.tiles
    print(f"{len(rows)} patients, {len(slides)} slides, {tiles} tiles; {(chunked['status'] == 'ok').sum()} predicted")
    print(f"  (a) extraction only          {bare:6.1f} s  {tiles / bare:5.1f} tiles/s")
    print(f"  (b) predict, {args.chunk_size:>3} patients/call {by_chunk:6.1f} s  {tiles / by_chunk:5.1f} tiles/s"
          f"  ratio b/a {by_chunk / bare:.2f}")
    print(f"  (c) predict, one call        {one_call:6.1f} s  {tiles / one_call:5.1f} tiles/s"
          f"  ratio c/a {one_call / bare:.2f}")


if __name__ == "__main__":
    main()
