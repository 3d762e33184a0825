"""Standalone 2-process CPU DDP training (gloo), run by tests/test_training_ddp.py through
subprocess: Lightning's `ddp` strategy re-launches sys.argv, which must not be pytest."""
import json
import sys
import warnings

import torch
from lightning.pytorch.callbacks import Callback

from id2face.config import load_config
from id2face.launch.task import train_and_evaluate
from id2face.training import fit

warnings.filterwarnings("ignore")


class ParameterChecksums(Callback):
    """After training, gather every rank's per-tensor checksums of the trainable parameters."""

    def __init__(self, path: str):
        self.path = path
        self.start = None

    @staticmethod
    def checksums(trainer, pl_module):
        trainable = [p.detach().double() for p in pl_module.model.trainable_modules().parameters()]
        sums = torch.stack([p.sum() for p in trainable] + [p.abs().sum() for p in trainable])
        return trainer.strategy.all_gather(sums)  # (world, n)

    def on_train_start(self, trainer, pl_module):
        self.start = self.checksums(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        end = self.checksums(trainer, pl_module)
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                json.dump({"world_size": trainer.world_size, "global_step": trainer.global_step,
                           "start": self.start.tolist(), "checksums": end.tolist(),
                           "gradient_as_bucket_view": trainer.strategy.model.gradient_as_bucket_view}, handle)


if __name__ == "__main__":
    root, out, strategy = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "ddp"
    sweep_task = len(sys.argv) > 4 and sys.argv[4] == "sweep-task"
    cfg = load_config(["tiny"], [f"run.root={root}", f"trainer.strategy={strategy}", "trainer.devices=2",
                                 "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.limit_val_batches=0",
                                 "data.batch_size=2", "data.dataset.params.num_identities=40",
                                 "data.dataset.params.samples_per_identity=4", "eval.limit=8", "eval.diversity_k=1",
                                 "eval.recognizers=[{name: encoder, params: {encoder: tiny}}]"])
    if sweep_task:  # what a multi-GPU SLURM task runs: every rank trains, rank 0 then evaluates alone
        metrics = train_and_evaluate(cfg)
        if metrics:
            with open(out, "w") as handle:
                json.dump(metrics, handle)
    else:
        fit(cfg, callbacks=[ParameterChecksums(out)])
