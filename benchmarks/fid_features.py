"""FID feature extraction (``id2face.metrics.build_fid``, torch-fidelity's Inception-v3 inside
torchmetrics) vs N: images/s and memory.

Weights are random (built in torch-fidelity's own class and saved in its file format, then loaded
through the real ``eval.fid.weights`` path): speed does not depend on them. Each N updates the
metric with N real and N generated images in batches and computes the FID once.
``state MiB`` is the metric's own state (running sums and the 2048x2048 covariance sums: it does
not grow with N); ``peak MiB`` the process's peak RSS so far (CPU: a high-water mark over the
rows in order) or the CUDA peak allocation of the row.

    .venv/bin/python benchmarks/fid_features.py [--sizes 64 256 1024] [--batch 64] [--image-size 256]
        [--device cpu|cuda] [--threads T]

Prints a table; the last line is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402


def random_inception_file(folder: Path) -> Path:
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    # Building the class normally downloads the weights; skip that once, keep the architecture.
    load, fetch = fidelity.FeatureExtractorInceptionV3.load_state_dict, fidelity.load_state_dict_from_url
    fidelity.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    fidelity.load_state_dict_from_url = lambda *a, **k: {}
    try:
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        fidelity.FeatureExtractorInceptionV3.load_state_dict, fidelity.load_state_dict_from_url = load, fetch
    path = folder / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(weights: Path, n: int, batch: int, size: int, device: torch.device) -> dict:
    from id2face.metrics.fid import build_fid

    fid = build_fid(weights=weights).to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=generator).mul(2).sub(1).to(device)
    fid.update(images[:2], real=True)  # warm-up: kernels, lazy allocations
    fid.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = 0
    while done < n:
        chunk = images[: min(batch, n - done)]
        fid.update(chunk, real=True)
        fid.update(chunk.flip(-1), real=False)
        done += len(chunk)
    value = fid.compute()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    state = sum(t.numel() * t.element_size() for t in fid.metric_state.values() if torch.is_tensor(t))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()
    return {"n": n, "seconds": seconds, "images_per_s": 2 * n / seconds, "state_mib": state / 2**20,
            "peak_mib": peak, "fid": float(value)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="input side (Inception resizes to 299)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_inception_file(Path(tmp))
        for n in args.sizes:
            rows.append(measure(weights, n, args.batch, args.image_size, device))
            r = rows[-1]
            print(f"N={r['n']:>6}  {r['seconds']:8.1f} s  {r['images_per_s']:8.1f} img/s  "
                  f"state {r['state_mib']:6.1f} MiB  peak {r['peak_mib']:7.1f} MiB", flush=True)
    print(json.dumps({"benchmark": "fid_features", "device": C.machine_description(device), "batch": args.batch,
                      "image_size": args.image_size, "threads": torch.get_num_threads(), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
