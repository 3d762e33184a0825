"""Cost of identity retrieval (``IdentityRetrieval.compute``) on CPU: time and peak memory vs N.

Each measurement runs in a fresh subprocess so that the peak resident set size (``ru_maxrss``) is
its own: ``peak_extra_mb`` = peak RSS during update+compute minus the RSS once the (N, D) embeddings
exist. Chunked search keeps the extra memory O(N x chunk); the unchunked run (chunk = N, only up to
``--unchunked-max``) shows the O(N^2) alternative.

    .venv/bin/python benchmarks/retrieval_cost.py [--sizes 1000 10000 50000] [--dim 512] [--chunk 1024]

Prints a table; the last line is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(n: int, dim: int, chunk: int, threads: int | None) -> dict:
    import resource
    import time

    import torch

    from id2face.metrics import IdentityRetrieval

    if threads:
        torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    original = torch.randn(n, dim, generator=generator)
    anonymized = original + 2.0 * torch.randn(n, dim, generator=generator)
    identities = torch.arange(n) // 4
    IdentityRetrieval(chunk_size=chunk).update(original[:8], anonymized[:8])  # warm-up imports and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metric = IdentityRetrieval(chunk_size=chunk)
    metric.update(original, anonymized, identities)
    result = metric.compute()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"n": n, "dim": dim, "chunk": chunk, "seconds": round(seconds, 3),
            "peak_extra_mb": round((after - before) / 1024, 1), "embeddings_mb": round(2 * n * dim * 4 / 2**20, 1),
            "score_block_mb": round(min(chunk, n) * n * 4 / 2**20, 1), "top1": round(result["top1"].item(), 4),
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--unchunked-max", type=int, default=10000,
                        help="also run chunk = N for N up to this (O(N^2) memory)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--child", nargs=3, type=int, metavar=("N", "DIM", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child, args.threads)))
        return 0

    runs = []
    for n in args.sizes:
        for chunk in [args.chunk] + ([n] if n <= args.unchunked_max and n > args.chunk else []):
            command = [sys.executable, __file__, "--child", str(n), str(args.dim), str(chunk)]
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"N={r['n']:>6}  chunk={r['chunk']:>6}  {r['seconds']:>8.2f} s  peak +{r['peak_extra_mb']:>7.1f} MB  "
                  f"(score block {r['score_block_mb']:.1f} MB, embeddings {r['embeddings_mb']:.1f} MB)", flush=True)
    print(json.dumps({"benchmark": "retrieval_cost", "dim": args.dim, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
