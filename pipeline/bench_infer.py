"""`segpipe bench infer`: the inference stage's throughput against the bare model on the same batches.

Efficiency = end-to-end images/s of `segpipe infer` (shards read, decoded, through the model actor,
post-processed, written and merged; Ray's own start and stop excluded, the actor's model load included)
divided by the raw model's images/s: `model.forward` alone over the same images, decoded and cut into
the same batches beforehand, in one process with the same torch threads. Each run is a fresh process;
the kinds alternate within each repeat so that they share the machine's noise; reported: the ratio of the
medians, and the median of each repeat's ratio (paired).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def prepare(data: Path, images: int, height: int, width: int, seed: int = 0) -> Path:
    """A synthetic split as tar shards of 64 images (made once, reused); returns the shards folder."""
    from pipeline.synth import SynthConfig, write_dataset

    marker = data / "ready.json"
    wanted = {"images": images, "height": height, "width": width, "seed": seed}
    if not (marker.exists() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(str(data), SynthConfig(images=images, split="val", seed=seed, height=height, width=width,
                                             shard_size=64, workers=os.cpu_count() or 1))
        marker.write_text(json.dumps(wanted))
    return data / "shards"


def _settings(data: Path, weights: str | None):
    from pipeline.fusion import FusionConfig
    from pipeline.io.fs import read_json
    from pipeline.models import ModelSettings

    categories = None if weights else tuple(read_json(str(data / "annotations" / "panoptic_val.json"))["categories"])
    return ModelSettings(weights=weights, random_weights=weights is None, seed=0, categories=categories,
                         min_size=256, max_size=512, fusion=FusionConfig(stuff_area_threshold=64))


def raw(data: Path, model: str, weights: str | None, batch_size: int, threads: int) -> dict:
    """The bare model: decoded batches in memory, `forward` timed over all of them after one warm-up."""
    import torch

    from pipeline.io.decode import decode_image
    from pipeline.io.shards import list_shards, read_shard
    from pipeline.models import load_model

    torch.set_num_threads(threads)
    net = load_model(model, _settings(data, weights))
    batches = []
    for shard in list_shards(str(data / "shards")):
        images = [decode_image(record.data) for record in read_shard(shard)]
        batches += [images[i:i + batch_size] for i in range(0, len(images), batch_size)]  # cut per shard, as infer
    net.forward(batches[0])
    start = time.perf_counter()
    for batch in batches:
        net.forward(batch)
    seconds = time.perf_counter() - start
    count = sum(len(b) for b in batches)
    return {"images": count, "seconds": seconds, "images_per_s": count / seconds}


def pipeline(data: Path, model: str, weights: str | None, batch_size: int, actors: int, threads: int, out: Path) -> dict:
    """`segpipe infer` end to end into a fresh folder; one actor gets `threads` CPUs (and so threads),
    more actors share what the read and post-processing tasks leave (the default)."""
    from pipeline.infer import InferConfig, run

    shutil.rmtree(out, ignore_errors=True)
    summary = run(InferConfig(input=str(data / "shards"), out=str(out), model=model, settings=_settings(data, weights),
                              batch_size=batch_size, actors=actors, cpus_per_actor=float(threads) if actors == 1 else None))
    seconds = summary.wall_s - summary.ray_s
    return {"images": summary.images, "segments": summary.segments, "seconds": seconds,
            "images_per_s": summary.images / seconds,
            "steady_images_per_s": summary.steady_images_per_s, "ray_s": summary.ray_s,
            "stage_s": summary.stage_s, "actors": summary.actors}


def _fresh(kind: str, **kwargs) -> dict:
    """One measurement in a new Python process; its JSON result."""
    command = [sys.executable, "-m", "pipeline.bench_infer", kind, json.dumps({k: str(v) if isinstance(v, Path) else v
                                                                             for k, v in kwargs.items()})]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(data: Path, images: int, height: int, width: int, model: str, weights: str | None, batch_size: int,
        threads: int, repeat: int, actor_counts: list[int], out: Path, echo=print) -> dict:
    """Measure, write the report JSON, print a table; returns the report."""
    prepare(data, images, height, width)
    runs: dict[str, list[dict]] = {"raw": [], **{f"pipeline-{a}": [] for a in actor_counts}}
    for r in range(repeat):
        runs["raw"].append(_fresh("raw", data=data, model=model, weights=weights, batch_size=batch_size, threads=threads))
        for a in actor_counts:
            runs[f"pipeline-{a}"].append(_fresh("pipeline", data=data, model=model, weights=weights, batch_size=batch_size,
                                                actors=a, threads=threads, out=data / "out"))
        echo(f"repeat {r + 1}/{repeat}: " + ", ".join(f"{k} {v[-1]['images_per_s']:.2f} img/s" for k, v in runs.items()))
    segments = runs[f"pipeline-{actor_counts[0]}"][-1]["segments"] / images
    median = {k: statistics.median(m["images_per_s"] for m in v) for k, v in runs.items()}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "setup": {"images": images, "size": [height, width], "model": model, "batch_size": batch_size,
                  "threads": threads, "repeat": repeat, "weights": weights or "random (seed 0)"},
        "segments_per_image": segments,
        "median_images_per_s": median,
        "efficiency": {f"pipeline-{a}": median[f"pipeline-{a}"] / median["raw"] for a in actor_counts},
        # Each repeat's pipeline run against the raw run beside it, the median of those ratios: less
        # sensitive to the machine's drift over the whole measurement than the ratio of the medians.
        "efficiency_paired": {f"pipeline-{a}": statistics.median(p["images_per_s"] / r["images_per_s"]
                                                                  for p, r in zip(runs[f"pipeline-{a}"], runs["raw"]))
                              for a in actor_counts},
        "scaling": {f"pipeline-{a}": median[f"pipeline-{a}"] / median[f"pipeline-{actor_counts[0]}"]
                    for a in actor_counts},
        "runs": runs,
    }
    out.write_text(json.dumps(report, indent=1))
    echo(f"{'run':14} {'images/s':>9} {'efficiency':>10} {'paired':>7} {'scaling':>8}")
    echo(f"{'raw model':14} {median['raw']:9.2f}")
    for a in actor_counts:
        key = f"pipeline-{a}"
        echo(f"{key:14} {median[key]:9.2f} {report['efficiency'][key]:10.3f} {report['efficiency_paired'][key]:7.3f} "
             f"{report['scaling'][key]:8.2f}")
    return report


if __name__ == "__main__":
    kind, arguments = sys.argv[1], json.loads(sys.argv[2])
    arguments["data"] = Path(arguments["data"])
    if "out" in arguments:
        arguments["out"] = Path(arguments["out"])
    result = raw(**arguments) if kind == "raw" else pipeline(**arguments)
    print(json.dumps(result))
