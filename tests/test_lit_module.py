"""ID2FaceModule (optimiser, warmup, EMA, validation, checkpoints) and the `train` / `config --build` commands."""
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from id2face.config import load_config
from id2face.errors import UserError
from id2face.lit_module import ID2FaceModule
from id2face.model import FROZEN_ROLES, count_parameters

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights",
                                        "ignore:.*does not have many workers",
                                        "ignore:Found .* module\\(s\\) in eval mode")
REPO = Path(__file__).resolve().parents[1]



class SynthPairs(Dataset):
    """(A, B) = samples 0 and 1 of identity i (no datamodule needed)."""

    def __init__(self, num_pairs=4):
        from id2face.data.synthfaces import render_sample

        self.items = [{"a": render_sample(i, 0, 32), "b": render_sample(i, 1, 32)} for i in range(num_pairs)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_module(*overrides):
    torch.manual_seed(0)
    return ID2FaceModule(load_config(["tiny"], list(overrides)))


@pytest.fixture(scope="module")
def loader():
    return DataLoader(SynthPairs(), batch_size=2)


def test_optimizer_holds_exactly_the_trainable_parameters():
    module = tiny_module("model.optim.warmup_steps=4", "model.optim.lr=1e-3")
    config = module.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    frozen = {id(p) for role in FROZEN_ROLES for p in getattr(module.model, role).parameters()}
    assert frozen and in_optimizer.isdisjoint(frozen)
    assert in_optimizer.isdisjoint({id(p) for p in module.ema.parameters()})
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == count_parameters(module.model)[0]
    assert not optimizer.param_groups[0]["fused"]  # fused only on CUDA
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_ema_copy_is_frozen_and_its_unet_uses_its_own_gates():
    module = tiny_module()
    assert not any(p.requires_grad for p in module.ema.parameters())
    ema_unet, ema_harmonizer = module.ema.module["backbone"].unet, module.ema.module["harmonizer"]
    ema_gates = {id(g) for g in ema_harmonizer.gates.values()}
    live_gates = {id(g) for g in module.model.harmonizer.gates.values()}
    used = {id(p.gate) for name, p in ema_unet.attn_processors.items() if name.endswith("attn2.processor")}
    assert used == ema_gates and used.isdisjoint(live_gates)
    module.train()
    assert not module.ema.training and module.model.backbone.training


def test_ema_update_is_an_exponential_moving_average_and_swaps_back_exactly():
    module = tiny_module("model.optim.ema_decay=0.9")
    live = list(module.model.trainable_modules().parameters())
    module.ema.update_parameters(module.model.trainable_modules())  # first update: a copy
    start = [p.detach().clone() for p in live]
    with torch.no_grad():
        for p in live:
            p.add_(1.0)
    module.ema.update_parameters(module.model.trainable_modules())
    for average, p0 in zip(module.ema.module.parameters(), start):
        torch.testing.assert_close(average, p0 + 0.1)
    with module.ema_weights():
        for p, p0 in zip(live, start):
            torch.testing.assert_close(p, p0 + 0.1)
    for p, p0 in zip(live, start):
        assert torch.equal(p, p0 + 1.0)


def test_sync_free_ema_update_is_averaged_models_update():
    ours, reference = tiny_module("model.optim.ema_decay=0.9"), tiny_module("model.optim.ema_decay=0.9")
    for step in range(3):
        for module in (ours, reference):
            with torch.no_grad():
                for p in module.model.trainable_modules().parameters():
                    p.add_(0.1 * (step + 1))
        ours.update_ema()
        reference.ema.update_parameters(reference.model.trainable_modules())
    for a, b in zip(ours.ema.module.parameters(), reference.ema.module.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert int(ours.ema.n_averaged) == int(reference.ema.n_averaged) == ours._ema_updates == 3


def test_a_k_step_ema_update_is_k_single_step_updates_toward_the_same_weights():
    one, single = tiny_module("model.optim.ema_decay=0.9"), tiny_module("model.optim.ema_decay=0.9")
    start = [p.detach().clone() for p in one.model.trainable_modules().parameters()]
    for module in (one, single):
        module.update_ema()  # the first update copies
        with torch.no_grad():
            for p in module.model.trainable_modules().parameters():
                p.add_(1.0)
    one.update_ema(steps=3)
    for _ in range(3):
        single.update_ema()
    for a, b, p0 in zip(one.ema.module.parameters(), single.ema.module.parameters(), start, strict=True):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, p0 + (1 - 0.9 ** 3))


def test_ema_every_k_steps_updates_at_every_kth_step_and_resumes_from_the_last_update(loader, tmp_path):
    module = tiny_module("model.optim.ema_decay=0.9", "model.optim.ema_every=3")
    trainer = L.Trainer(accelerator="cpu", max_steps=7, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    assert module._ema_step == 6 and int(module.ema.n_averaged) == module._ema_updates == 2  # steps 3 and 6
    trainer.save_checkpoint(tmp_path / "step7.ckpt")
    restored = ID2FaceModule.load_from_checkpoint(tmp_path / "step7.ckpt")
    assert restored._ema_step == 6  # the next update, at step 9, weighs 3 steps: 7, 8, 9
    with pytest.raises(UserError, match=r"^model\.optim\.ema_every takes a whole number >= 1, got 0$"):
        tiny_module("model.optim.ema_every=0")


def test_fit_steps_log_updates_ema_and_validates(loader):
    module = tiny_module("model.optim.ema_decay=0.5")
    initial = [p.detach().clone() for p in module.ema.module.parameters()]
    trainer = L.Trainer(accelerator="cpu", fast_dev_run=2, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/diffusion", "train/id_vae", "train/alignment", "val/loss", "val/diffusion"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert int(module.ema.n_averaged) == 2 and module._ema_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(module.ema.module.parameters(), initial))
    assert not module._ema_swapped  # live weights back after validation
    # The EMA (decay 0.5 over 2 steps) lags the live weights.
    live = list(module.model.trainable_modules().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(module.ema.module.parameters(), live))


def test_validation_loss_is_seeded(loader):
    module = tiny_module()
    batch = next(iter(loader))
    module.eval()
    values = []
    for _ in range(2):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            values.append(module.model.training_losses(batch, generator=generator)["loss"])
    assert values[0] == values[1]


def test_checkpoint_round_trip_keeps_model_and_ema(loader, tmp_path):
    module = tiny_module("model.harmonizer.name=sum")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    restored = ID2FaceModule.load_from_checkpoint(path)
    assert restored.model.harmonizer.registered_name == "sum"
    assert restored._ema_updates == 1  # the next update averages instead of copying
    for (name, a), b in zip(module.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name


def test_log_images_and_anonymize_use_the_ema_weights_and_restore_the_live_ones(loader):
    module = tiny_module()
    batch = next(iter(loader))
    live = [p.detach().clone() for p in module.model.trainable_modules().parameters()]
    module.ema.update_parameters(module.model.trainable_modules())
    with torch.no_grad():
        for p in module.ema.module["backbone"].parameters():
            p.mul_(0.5)  # an EMA visibly different from the live weights
    images, masks = batch["a"]["image"], batch["a"]["mask"]
    kwargs = dict(num_inference_steps=2)
    with_ema = module.anonymize(images, masks, generator=torch.Generator().manual_seed(0), **kwargs)
    module.eval()
    with_live = module.model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), **kwargs)
    assert not torch.equal(with_ema, with_live)
    module.train()
    grids = module.log_images(batch, **kwargs)
    assert set(grids) == {"source", "masked", "recomposed", "anonymized"}
    assert module.training and module.model.backbone.training
    assert all(torch.equal(p, q) for p, q in zip(module.model.trainable_modules().parameters(), live))


def run_cli(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "id2face.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_train_fast_dev_run(tmp_path):
    out = run_cli("train", "tiny", "trainer.fast_dev_run=true", "data.batch_size=2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max_steps=1" in out.stderr + out.stdout  # Lightning's fast_dev_run stop message


DDP_SCRIPT = """
import json, os, sys, warnings
import torch, torch.distributed as dist
warnings.filterwarnings("ignore")
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
from id2face.config import load_config
from id2face.lit_module import ID2FaceModule
module = ID2FaceModule(load_config(["tiny"]))
logging_data = torch.nn.parallel.DistributedDataParallel(module)._get_ddp_logging_data()
trainable = [p for p in module.parameters() if p.requires_grad]
print(json.dumps({"reducer_tensors": logging_data["num_parameter_tensors"],
                  "reducer_bytes": logging_data["total_parameter_size_bytes"],
                  "trainable_tensors": len(trainable), "trainable_bytes": sum(p.numel() * 4 for p in trainable),
                  "all_tensors": len(list(module.parameters()))}))
dist.destroy_process_group()
"""


def test_ddp_syncs_gradients_of_trainable_parameters_only():
    """requires_grad=False keeps the frozen encoders and the EMA copy out of DDP's gradient reducer."""
    import json
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(port)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["reducer_tensors"] == facts["trainable_tensors"] < facts["all_tensors"]
    assert facts["reducer_bytes"] == facts["trainable_bytes"]


def test_config_build_prints_parameter_counts_per_component():
    out = run_cli("config", "tiny", "--build")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[1]: line.split() for line in out.stdout.splitlines() if line.startswith("#   ")}
    assert set(rows) >= {"identity_encoder", "id_vae", "attribute_encoder", "harmonizer", "backbone",
                         "identity_tokens"}
    trainable, total = (int(rows["backbone"][k].replace(",", "")) for k in (3, 5))
    assert trainable == total > 500_000
    assert int(rows["identity_encoder"][3].replace(",", "")) == 0 < int(rows["identity_encoder"][5].replace(",", ""))
    assert rows["harmonizer"][2] == "gated"


def test_config_build_with_an_unknown_name_lists_the_valid_ones():
    out = run_cli("config", "tiny", "model.harmonizer.name=nope", "--build")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "unknown harmonizer 'nope'; valid names: concat, gated, sum" in errors[0]


def bf16_training_steps(module, pairs, accelerator, steps=3, batch_size=2):
    """Fit ``steps`` optimiser steps under ``precision="bf16-mixed"``; returns (seconds per step,
    UNet output dtypes seen)."""
    import time

    times, dtypes = [], []
    module.model.backbone.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))

    def sync():
        if accelerator == "gpu":
            torch.cuda.synchronize()

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_steps=steps,
                        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StepTimer()])
    trainer.fit(module, train_dataloaders=DataLoader(pairs, batch_size=batch_size))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return times, dtypes


def test_bf16_mixed_training_step_runs_on_cpu(loader):
    module = tiny_module()
    before = [p.detach().clone() for p in module.model.backbone.parameters()]
    _, dtypes = bf16_training_steps(module, SynthPairs(2), "cpu", steps=1)
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the UNet ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # fp32 master weights
    assert any(not torch.equal(p, q) for p, q in zip(module.model.backbone.parameters(), before))


@pytest.mark.gpu
@pytest.mark.slow
def test_bf16_training_step_of_the_sd15_shaped_model_on_gpu():
    """Paper-scale model (random-init SD-1.5-sized UNet + SD VAE, tiny identity encoder) at 512 px:
    bf16-mixed training steps run; prints the step time and peak GPU memory."""
    cfg = load_config([], ["model.identity_encoder.name=tiny", "model.first_stage.params.random_init=true"])
    torch.manual_seed(0)
    module = ID2FaceModule(cfg)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 512, 512)
    mask[:, 160:400, 128:384] = 1

    def item():
        return {"image": torch.rand(3, 512, 512, generator=g) * 2 - 1, "mask": mask.clone()}

    pairs = [{"a": item(), "b": item()} for _ in range(16)]
    torch.cuda.reset_peak_memory_stats()
    times, dtypes = bf16_training_steps(module, pairs, "gpu", steps=4, batch_size=4)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"SD-1.5-shaped ID2Face, 4 pairs (8 UNet samples) at 512 px, bf16-mixed on "
          f"{torch.cuda.get_device_name()}: {min(times[1:]):.3f} s/step (first {times[0]:.1f} s), "
          f"peak memory {peak:.1f} GiB")
    assert set(dtypes) == {torch.bfloat16} and len(times) == 4
