"""What one sweep task does: train in its run folder (resuming), then evaluate into metrics.json."""
from __future__ import annotations

import torch
from omegaconf import DictConfig


def train_and_evaluate(cfg: DictConfig) -> dict:
    from lightning.pytorch.utilities import rank_zero_only

    from ..commands.eval import build_judges, evaluate
    from ..lit_module import ID2FaceModule
    from ..metrics.table import save_metrics
    from ..training import final_checkpoint, fit, split_path

    # Rank 0 evaluates: a judge missing there fails the task now, not after its training.
    judges = build_judges(cfg) if rank_zero_only.rank == 0 else None
    folder = fit(cfg)
    rank = 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Lightning keeps training's process group until exit; evaluation is rank 0 alone, and its
        # metrics would otherwise gather on compute() from ranks that have already returned.
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
    if rank == 0:
        checkpoint = torch.load(final_checkpoint(folder), map_location="cpu", weights_only=False)
        module = ID2FaceModule(cfg)
        module.load_state_dict(checkpoint["state_dict"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        metrics, meta = evaluate(module, cfg, device=device, progress=False,
                                 split_file=split_path(cfg, folder), judges=judges)
        meta["checkpoint"] = str(final_checkpoint(folder))
        save_metrics(folder, metrics, meta)
        return metrics
    return {}
