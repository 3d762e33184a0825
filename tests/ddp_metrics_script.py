"""Standalone 2-process CPU DDP (gloo) check of the id2face metrics; run by tests/test_metrics_ddp.py.

    python tests/ddp_metrics_script.py OUT_DIR

Each rank updates every metric with its own uneven shard of one fixed data set, computes (which
gathers the states across ranks) and writes OUT_DIR/rank<r>.json. ``compute_metrics(None)`` is the
single-process result on the whole set, for comparison. Never run DDP inside pytest itself
(ENVIRONMENT.md: the launcher would re-run the pytest session).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
from torch import nn

WORLD_SIZE = 2
N = 131          # odd on purpose: uneven shards
SPLIT = 70       # rank 0 gets rows [0, 70), rank 1 rows [70, 131)


class ShardFeatures(nn.Module):
    num_features = 12

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("projection", torch.randn(3 * 4 * 4, self.num_features, generator=generator) / 4)

    def forward(self, images):
        return torch.tanh(nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.projection)


def make_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    identities = torch.arange(N) // 3
    centres = torch.randn(N // 3 + 1, 24, generator=generator)
    original = centres[identities] + 0.5 * torch.randn(N, 24, generator=generator)
    anonymized = original + 1.5 * torch.randn(N, 24, generator=generator)
    return {
        "identities": identities,
        "original": original,
        "anonymized": anonymized,
        "samples": torch.randn(N, 4, 24, generator=generator),  # K = 4 anonymizations per face
        "attr_original": torch.randn(N, 3, generator=generator) * 10,
        "attr_anonymized": torch.randn(N, 3, generator=generator) * 10,
        "real_images": torch.rand(N, 3, 8, 8, generator=generator) * 2 - 1,
        "fake_images": (torch.rand(N, 3, 8, 8, generator=generator) * 2 - 1) * 0.7 + 0.2,
    }


def compute_metrics(rank: int | None) -> dict[str, float]:
    """All metrics on rank's shard (synced over the process group), or on everything if rank is None."""
    from id2face.metrics import (AttributePreservation, IdentityDiversity, IdentityRetrieval, VerificationRate,
                                 build_fid)

    data = make_data()
    rows = slice(None) if rank is None else (slice(0, SPLIT) if rank == 0 else slice(SPLIT, None))
    shard = {k: v[rows] for k, v in data.items()}
    retrieval = IdentityRetrieval(chunk_size=16)
    retrieval_labelled = IdentityRetrieval(chunk_size=16)
    verification = VerificationRate(far=0.01, chunk_size=16)
    diversity = IdentityDiversity()
    attributes = AttributePreservation(["yaw", "pitch", "roll"], groups={"pose": ["yaw", "pitch", "roll"]})
    fid = build_fid(feature_extractor=ShardFeatures())
    # two updates per rank: list states with several entries per rank
    for part in (slice(0, 20), slice(20, None)):
        s = {k: v[part] for k, v in shard.items()}
        retrieval.update(s["original"], s["anonymized"])
        retrieval_labelled.update(s["original"], s["anonymized"], s["identities"])
        verification.update(s["original"], s["anonymized"], s["identities"])
        diversity.update(s["samples"])
        attributes.update(s["attr_original"], s["attr_anonymized"])
        fid.update(s["real_images"], real=True)
        fid.update(s["fake_images"], real=False)
    out = {}
    out.update({f"retrieval/{k}": v.item() for k, v in retrieval.compute().items()})
    out.update({f"retrieval_labelled/{k}": v.item() for k, v in retrieval_labelled.compute().items()})
    out.update({f"verification/{k}": v.item() for k, v in verification.compute().items()})
    out["diversity"] = diversity.compute().item()
    out.update({f"attributes/{k}": v.item() for k, v in attributes.compute().items()})
    out["fid"] = fid.compute().item()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        result = compute_metrics(rank)
        result["world_size"] = dist.get_world_size()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result, indent=2))
        # Neither rank tears gloo down while the other may still use it: without this, a rank
        # once died with "terminate called without an active exception" (SIGABRT) at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # About one run in 35 still died with that SIGABRT after both ranks had written their results
    # (CI, 2026-11-27; 1 of 36 runs here): gloo's threads outlive destroy_process_group and abort at
    # interpreter finalisation (pytorch#179291). The results are on disk, so skip finalisation.
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    import torch.multiprocessing as mp

    out_dir = sys.argv[1]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD_SIZE, join=True)
