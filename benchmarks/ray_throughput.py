"""Throughput of ``m2ae-deblur --ray`` against the single-process ``m2ae-deblur`` on one machine, the outputs
compared byte for byte, and a batch that loses workers on the way.

    python -m m2ae_infer.benchmarks.ray_throughput [--images 50] [--workers 1 2] [--json FILE]

Steps: (1) make ``--images`` photos (seeded crops of scikit-image's photos and of the shipped example, 256x256 to
480x640, PNG and JPEG) in a temporary folder; (2) run the plain ``m2ae-deblur`` on them in a subprocess (the
reference files; its wall time includes importing torch and loading the checkpoint); (3) start one local Ray
cluster (timed) and run :func:`m2ae_infer.distributed.deblur_files` with each ``--workers`` count, reporting the
actors' start-up (the checkpoint loaded once per actor) apart from the images/s of the run itself; (4) run the batch
again with two injected worker deaths (one before an output is published, one after) and check that every output
is there once, byte-identical, with no temporary file left. Needs the ``ray`` and ``train`` (scikit-image) extras.
Timings on a shared machine are noisy: the JSON records the CPU count and the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEED = 17
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png",
          "coins.png", "page.png", "hubble_deep_field.jpg", "retina.jpg")


def make_images(folder: str | os.PathLike, count: int, seed: int = SEED,
                smallest: tuple[int, int] = (256, 256), largest: tuple[int, int] = (480, 640)) -> list[Path]:
    """Write ``count`` photos to ``folder``: random crops, between ``smallest`` and ``largest`` (H, W), of
    scikit-image's photos (colour and gray) and of the package's blurry example photo (every third one); every
    fifth image is a JPEG (quality 90), the rest PNG. Returns their paths, sorted."""
    import skimage.data as skdata
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    root = Path(skdata.__file__).parent
    import m2ae_infer
    example = Path(m2ae_infer.__file__).parent / "assets" / "example_blurry.png"
    sources = [np.asarray(Image.open(root / name)) for name in PHOTOS] + [np.asarray(Image.open(example))]
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        photo = sources[-1] if i % 3 == 0 else sources[int(rng.integers(len(sources) - 1))]
        ph, pw = photo.shape[:2]
        h = int(rng.integers(min(smallest[0], ph), min(largest[0], ph) + 1))
        w = int(rng.integers(min(smallest[1], pw), min(largest[1], pw) + 1))
        top, left = int(rng.integers(ph - h + 1)), int(rng.integers(pw - w + 1))
        crop = Image.fromarray(np.ascontiguousarray(photo[top:top + h, left:left + w]))
        path = folder / (f"photo{i:03d}.jpg" if i % 5 == 4 else f"photo{i:03d}.png")
        crop.convert("RGB").save(path, quality=90) if path.suffix == ".jpg" else crop.save(path)
        paths.append(path)
    return sorted(paths)


def same_files(reference: Path, output: Path) -> tuple[int, list[str]]:
    """(files byte-identical to the reference, names that differ or are missing; extra files count as differing)."""
    ref = {p.name: p.read_bytes() for p in reference.iterdir()}
    out = {p.name: p for p in output.iterdir()}
    bad = sorted({n for n in ref if n not in out or out[n].read_bytes() != ref[n]} | (set(out) - set(ref)))
    return len(ref) - len([n for n in bad if n in ref]), bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ray_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    result: dict = {"images": args.images, "cpus": os.cpu_count(), "load_average_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="m2ae-ray-bench-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "in", args.images)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "m2ae_infer.cli", str(tmp / "in"), "-o", str(tmp / "ref"), "-q"],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        result["single_process"] = {"wall_s": wall, "images_per_s_wall": args.images / wall}
        print(f"m2ae-deblur (one process, torch's default threads): {wall:.1f} s wall, "
              f"{args.images / wall:.2f} images/s including start-up")

        result["in_process"] = in_process(sorted((tmp / "in").iterdir()))

        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # the cluster on 127.0.0.1 only
        import logging

        import ray

        from m2ae_infer.distributed import deblur_files
        start = time.perf_counter()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        result["ray_init_s"] = time.perf_counter() - start
        print(f"ray.init (a new local cluster, {ray.cluster_resources().get('CPU', 0):g} CPUs): "
              f"{result['ray_init_s']:.1f} s")
        try:
            result["ray"] = []
            for workers in args.workers:
                out = tmp / f"out{workers}"
                start = time.perf_counter()
                s = deblur_files([tmp / "in"], out, workers=workers)
                total = time.perf_counter() - start
                same, bad = same_files(tmp / "ref", out)
                row = {"workers": workers, "startup_s": s.startup_seconds, "run_s": s.run_seconds, "call_s": total,
                       "images_per_s": len(s.written) / s.run_seconds, "written": len(s.written),
                       "identical": same, "differing": bad}
                result["ray"].append(row)
                print(f"--ray, {workers} worker(s): actors ready in {s.startup_seconds:.1f} s, then "
                      f"{row['images_per_s']:.2f} images/s ({s.run_seconds:.1f} s); call {total:.1f} s; "
                      f"{same}/{args.images} outputs byte-identical to m2ae-deblur{'; DIFFER: ' if bad else ''}"
                      f"{', '.join(bad)}")
            result["fault"] = fault_run(tmp, max(args.workers), args.images)
        finally:
            ray.shutdown()
    result["load_average_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = all(not r["differing"] for r in result["ray"]) and result["fault"]["ok"]
    return 0 if ok else 1


def in_process(paths: list[Path]) -> list[dict]:
    """One Deblurrer in this process (no Ray, no writing), with 1 and 2 torch threads: the steady state a Ray
    worker is compared with."""
    import torch

    from m2ae_infer import Deblurrer
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        deblurrer = Deblurrer(device="cpu")
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        for path in paths:
            deblurrer.run(path, return_info=True)
        run = time.perf_counter() - start
        rows.append({"threads": threads, "load_s": loaded, "run_s": run, "images_per_s": len(paths) / run})
        print(f"one process, in-process loop, {threads} torch thread(s): checkpoint loaded in {loaded:.1f} s, then "
              f"{len(paths) / run:.2f} images/s (decode + deblur, no writing)")
    return rows


def fault_run(tmp: Path, workers: int, count: int) -> dict:
    """The batch with two worker deaths injected (see ``distributed._DeblurWorker``), then checked."""
    from m2ae_infer.distributed import deblur_files
    files = sorted(p.name for p in (tmp / "in").iterdir())
    names = [files[len(files) // 3], files[2 * len(files) // 3]]
    faults = [{"name": names[0], "when": "publish", "marker": str(tmp / "died1")},
              {"name": names[1], "when": "return", "marker": str(tmp / "died2")}]
    out = tmp / "out_fault"
    s = deblur_files([tmp / "in"], out, workers=workers, _faults=faults)
    same, bad = same_files(tmp / "ref", out)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    row = {"workers": workers, "killed_on": names, "worker_deaths": s.worker_deaths, "retried": s.retried,
           "written": len(s.written), "failed": s.failed, "identical": same, "differing": bad,
           "temp_leftovers": leftovers, "exit_code": s.exit_code, "run_s": s.run_seconds}
    row["ok"] = s.exit_code == 0 and not bad and not leftovers and s.worker_deaths == 2 and len(s.written) == count
    print(f"--ray with 2 workers killed (before publishing {names[0]}, after publishing {names[1]}): "
          f"{s.worker_deaths} deaths, {s.retried} inputs rerun, {len(s.written)} written, {len(s.failed)} failed, "
          f"{same}/{count} byte-identical, {len(leftovers)} temporary files left, exit {s.exit_code}"
          f" -> {'OK' if row['ok'] else 'FAILED'}")
    return row


if __name__ == "__main__":
    sys.exit(main())
