"""How fast `ctcore.data.ImageData.batch` serves training batches: images per second on CPU (and CUDA if present).

    python benchmarks/bench_loader.py                      # 50,000 random 32x32 images, batch 1024
    python benchmarks/bench_loader.py --data cifar10.h5    # a dataset file written by `ctcore data import`
    python benchmarks/bench_loader.py --threads 2 --json

Each measurement draws `--steps` batches after `--warmup` untimed ones, with and without random flips, and
synchronises the device before reading the clock. Not a test: it prints numbers and exits 0.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ctcore.data import ImageData, read_hdf5_images


def _sync(device: torch.device) -> None:
    """Wait for queued device work so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(images: torch.Tensor, labels: torch.Tensor | None, device: torch.device, *, batch: int, steps: int,
            warmup: int, flip: bool) -> dict:
    """Images per second and milliseconds per batch of ImageData.batch on one device."""
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    data = ImageData(images, labels, random_flip=flip, num_classes=num_classes, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    for _ in range(warmup):
        data.batch(batch, generator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x, _ = data.batch(batch, generator)
    _sync(device)
    seconds = time.perf_counter() - start
    assert x.shape == (batch, *images.shape[1:]) and x.dtype == torch.float32
    return {"device": str(device), "flip": flip, "batch": batch, "shape": list(images.shape[1:]),
            "images_per_s": steps * batch / seconds, "ms_per_batch": 1000 * seconds / steps}


def main() -> None:
    """Parse the options, run each measurement, print one line (or one JSON list)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="an HDF5 dataset file (default: random uint8 images)")
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.data:
        start = time.perf_counter()
        images, labels, _ = read_hdf5_images(args.data)
        load_s = time.perf_counter() - start
        source = f"{args.data} ({images.shape[0]:,} images, read in {load_s:.2f} s)"
    else:
        g = torch.Generator().manual_seed(0)
        shape = (args.num_images, 3, args.resolution, args.resolution)
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (args.num_images,), generator=g)
        source = f"random uint8 images {tuple(shape)}"

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = [measure(images, labels, device, batch=args.batch, steps=args.steps, warmup=args.warmup, flip=flip)
               for device in devices for flip in (False, True)]
    if args.json:
        print(json.dumps({"source": source, "cpu_threads": torch.get_num_threads(), "results": results}, indent=2))
        return
    print(f"ImageData.batch on {source}; {torch.get_num_threads()} CPU threads")
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        print(f"  {r['device']:<5} flip={'on ' if r['flip'] else 'off'} batch {r['batch']} {shape}: "
              f"{r['images_per_s']:>12,.0f} img/s  ({r['ms_per_batch']:.2f} ms/batch)")


if __name__ == "__main__":
    main()
