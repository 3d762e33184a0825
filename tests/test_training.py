"""Run folders, resume, and preemption: a killed run continues from its checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import OmegaConf

from id2face.config import load_config
from id2face.training import fit, optimizer_fingerprint, resume_checkpoint, run_dir

REPO = Path(__file__).resolve().parents[1]
FAST = ["data.batch_size=2", "data.dataset.params.num_identities=40", "data.dataset.params.samples_per_identity=4",
        "trainer.val_check_interval=1000", "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1"]


def state(folder: Path) -> dict:
    return json.loads((folder / "train_state.json").read_text())


def checkpoint_step_and_fingerprint(path: Path) -> tuple[int, float]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return ckpt["global_step"], optimizer_fingerprint(ckpt["optimizer_states"][0])


def test_run_folder_layout_and_resume(tmp_path):
    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=4", "run.log_images_every_n_steps=2",
                                 "run.checkpoint_every_n_steps=2", *FAST])
    folder = fit(cfg)
    assert folder == run_dir(cfg) == tmp_path / "tiny" / "base" / "seed0"
    assert OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")) == OmegaConf.to_container(cfg)
    assert (folder / "split.json").is_file()
    assert {p.name for p in (folder / "checkpoints").glob("*.ckpt")} == {"last.ckpt", "epoch=0-step=2.ckpt",
                                                                         "epoch=0-step=4.ckpt"}
    last = folder / "checkpoints" / "last.ckpt"  # a relative link to the newest, not a second copy
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=4.ckpt"
    assert state(folder)["status"] == "finished" and state(folder)["global_step"] == 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"images": 0}).Reload()
    assert {"images/source", "images/anonymized"} <= set(events.Tags()["images"])
    assert "train/loss" in events.Tags()["scalars"]

    # the same command again with more steps resumes: same step, same optimizer moments
    step, fingerprint = checkpoint_step_and_fingerprint(resume_checkpoint(folder))
    fit(load_config([str(folder / "config.yaml")], ["trainer.max_steps=6"]))
    resumed = state(folder)
    assert resumed["start_step"] == step == 4 and resumed["global_step"] == 6
    assert resumed["start_optimizer_fingerprint"] == pytest.approx(fingerprint, rel=1e-9) and fingerprint > 0
    assert resumed["resumed_from"].endswith("last.ckpt")


def test_a_signal_checkpoint_replaces_the_last_link_and_leaves_the_step_checkpoint(tmp_path):
    from types import SimpleNamespace

    from id2face.training import CheckpointOnSignal

    step_file = tmp_path / "epoch=0-step=4.ckpt"
    step_file.write_bytes(b"step 4")
    (tmp_path / "last.ckpt").symlink_to(step_file.name)
    on_signal = CheckpointOnSignal(tmp_path / "last.ckpt")
    on_signal.save(SimpleNamespace(save_checkpoint=lambda path: Path(path).write_bytes(b"step 6")))
    assert step_file.read_bytes() == b"step 4"
    assert not (tmp_path / "last.ckpt").is_symlink() and (tmp_path / "last.ckpt").read_bytes() == b"step 6"
    assert on_signal.saved
    # under DDP every rank saves, and only rank 0 writes: another rank leaves the link to it
    (tmp_path / "last.ckpt").unlink()
    (tmp_path / "last.ckpt").symlink_to(step_file.name)
    CheckpointOnSignal(tmp_path / "last.ckpt").save(SimpleNamespace(is_global_zero=False, save_checkpoint=lambda p: None))
    assert (tmp_path / "last.ckpt").is_symlink()


class SeenBatches(Callback):
    """Records each training batch as (epoch, a's first attribute factor, b's): a fingerprint of
    which faces, in which order, with which partners."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, batch["a"]["attr_factors"][:, 0].tolist(),
                             batch["b"]["attr_factors"][:, 0].tolist()))


def test_a_run_resumed_mid_epoch_sees_what_an_uninterrupted_run_sees(tmp_path):
    """Stopped after 2 and 5 steps (4 batches an epoch) and resumed each time: the epoch goes on with
    the batches it had not seen, in the same order, with the same partners, as one run of 7 steps."""
    small = ["data.batch_size=4", "data.dataset.params.num_identities=10", "data.dataset.params.samples_per_identity=2",
             "trainer.limit_val_batches=0", "run.checkpoint_every_n_steps=1", "run.log_images_every_n_steps=0",
             "model.optim.ema_every=2"]
    whole = SeenBatches()
    fit(load_config(["tiny"], [f"run.root={tmp_path / 'whole'}", "trainer.max_steps=7", *small]), callbacks=[whole])
    assert [epoch for epoch, _, _ in whole.batches] == [0, 0, 0, 0, 1, 1, 1]

    pieces = SeenBatches()
    folder = fit(load_config(["tiny"], [f"run.root={tmp_path / 'pieces'}", "trainer.max_steps=2", *small]),
                 callbacks=[pieces])
    for steps in (5, 7):
        fit(load_config([str(folder / "config.yaml")], [f"trainer.max_steps={steps}"]), callbacks=[pieces])
    assert state(folder)["start_step"] == 5 and state(folder)["global_step"] == 7
    assert pieces.batches == whole.batches
    assert whole.batches[0][2] != whole.batches[4][2] or whole.batches[0][1] != whole.batches[4][1]
    # and draws the same noise, timesteps and dropout: the same weights, live and averaged, bit for bit
    ends = [torch.load(f / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for f in (folder, run_dir(load_config([str(folder / "config.yaml")], [f"run.root={tmp_path / 'whole'}"])))]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 7 and ends[0]["ema_step"] == ends[1]["ema_step"] == 6
    assert ends[0]["state_dict"].keys() == ends[1]["state_dict"].keys()
    assert all(torch.equal(value, ends[1]["state_dict"][key]) for key, value in ends[0]["state_dict"].items())


def test_the_step_training_ends_on_is_checkpointed_and_last_links_to_it(tmp_path):
    """max_steps not a multiple of run.checkpoint_every_n_steps: the last steps are not lost."""
    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=5", "run.checkpoint_every_n_steps=2",
                                 "run.log_images_every_n_steps=0", *FAST])
    folder = fit(cfg)
    last = folder / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last).endswith("-step=5.ckpt")
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 5 == state(folder)["global_step"]
    assert (folder / "checkpoints" / "epoch=0-step=4.ckpt").is_file()


def test_checkpoints_hold_the_ema_of_their_own_step(tmp_path):
    """ema_decay 0: after each update the average is the live weights; every k-th step's checkpoint
    (saved by Lightning's callback, which runs before the module's batch-end hook) holds that."""
    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=4", "run.checkpoint_every_n_steps=2",
                                 "model.optim.ema_decay=0", "model.optim.ema_every=2",
                                 "run.log_images_every_n_steps=0", *FAST])
    folder = fit(cfg)
    for step in (2, 4):
        ckpt = torch.load(folder / "checkpoints" / f"epoch=0-step={step}.ckpt", map_location="cpu", weights_only=False)
        state_dict = ckpt["state_dict"]
        averaged = {k[len("ema.module."):]: v for k, v in state_dict.items()
                    if k.startswith("ema.module.") and v.is_floating_point()}
        assert ckpt["ema_step"] == step and averaged
        assert all(torch.equal(v, state_dict[f"model.{k}"]) for k, v in averaged.items() if f"model.{k}" in state_dict)


def test_a_checkpoint_saved_during_validation_keeps_live_and_averaged_weights_apart(tmp_path):
    """Validation runs on the EMA weights swapped into the model; a signal's checkpoint taken then
    must still hold the live weights as the model's and the average as the EMA's."""
    from id2face.lit_module import ID2FaceModule

    module = ID2FaceModule(load_config(["tiny"], [f"run.root={tmp_path}"]))
    with torch.no_grad():
        for p in module.ema.module.parameters():
            p.add_(1.0)  # an average unlike the live weights
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.on_validation_epoch_start()  # swaps the average in
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = {k: v.clone() for k, v in checkpoint["state_dict"].items()}  # as torch.save writes it, now
    module.on_validation_epoch_end()
    assert saved.keys() == before.keys()
    assert all(torch.equal(saved[k], v) for k, v in before.items())


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_killed_run_resumes_mid_epoch_with_same_step_and_optimizer(tmp_path, signum):
    args = ["train", "tiny", f"run.root={tmp_path}", "trainer.max_steps=400", "run.checkpoint_every_n_steps=1000", *FAST]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "id2face.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    folder = tmp_path / "tiny" / "base" / "seed0"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (folder / "train_state.json").is_file() and state(folder).get("global_step", 0) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()[-2000:]
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-2000:]
    assert "rerun the same command to resume" in out

    step, fingerprint = checkpoint_step_and_fingerprint(folder / "checkpoints" / "last.ckpt")
    batches_per_epoch = 32 // 2  # 80% of 40 identities x 4 images, batch 2 -> 64; any step < that is mid-epoch
    assert 3 <= step < batches_per_epoch * 4
    assert state(folder)["status"].startswith("preempted")

    restart = subprocess.run([sys.executable, "-m", "id2face.cli", "train", "tiny", f"run.root={tmp_path}",
                              f"trainer.max_steps={step + 2}", "run.checkpoint_every_n_steps=1000", *FAST],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-2000:]
    resumed = state(folder)
    assert resumed["start_step"] == step
    assert resumed["start_optimizer_fingerprint"] == pytest.approx(fingerprint, rel=1e-9)
    assert resumed["global_step"] == step + 2 and resumed["status"] == "finished"


def test_trainer_keys_reach_lightning_as_they_are(tmp_path, monkeypatch):
    """trainer.benchmark (cuDNN's algorithm search, a GPU speed switch) is a key of the config, and
    Lightning sets torch's flag from it."""
    from id2face.training import build_trainer

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = load_config(["tiny"], ["trainer.benchmark=true"])
    trainer = build_trainer(cfg, tmp_path, logger=False)
    assert torch.backends.cudnn.benchmark is True and trainer.max_steps == cfg.trainer.max_steps
    build_trainer(load_config(["tiny"]), tmp_path, logger=False)  # null: torch's flag untouched
    assert torch.backends.cudnn.benchmark is True


def test_a_strategy_mapping_adds_params_to_lightnings_named_strategy(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    from id2face.errors import UserError
    from id2face.training import build_trainer

    paper = load_config([str(REPO / "experiments" / "celebahq.yaml")]).trainer.strategy
    cfg = load_config(["tiny"], [f"trainer.strategy={OmegaConf.to_container(paper)}"])
    strategy = build_trainer(cfg, tmp_path, logger=False).strategy
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == "popen"  # Lightning's `ddp`
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True}  # what DistributedDataParallel gets
    # a communication hook by name (a YAML file cannot hold the function)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooked = load_config(["tiny"], ["trainer.strategy={name: ddp, params: {ddp_comm_hook: bf16_compress}}",
                                    "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.warns(UserWarning, match="registers DDP communication hooks on CUDA only; this run all-reduces "
                                         "uncompressed"):  # Lightning skips it on a CPU, silently
        strategy = build_trainer(hooked, tmp_path, logger=False).strategy
    assert strategy._ddp_comm_hook is default_hooks.bf16_compress_hook
    for node, message in [("{name: ddp, params: {ddp_comm_hook: bf16}}",
                           "ddp_comm_hook: unknown hook 'bf16'; valid: allreduce, fp16_compress, bf16_compress"),
                          ("{name: ddp, params: {gradient_as_bucket_veiw: true}}",
                           "trainer.strategy ddp: unknown params gradient_as_bucket_veiw; it takes .*static_graph"),
                          ("{name: dpp}", "unknown strategy 'dpp'; Lightning's are .*ddp_spawn"),
                          ("{kind: ddp}", "trainer.strategy as a mapping takes name and params, got \\['kind'\\]")]:
        with pytest.raises(UserError, match=message):
            build_trainer(load_config(["tiny"], [f"trainer.strategy={node}"]), tmp_path, logger=False)


def test_validation_interval_beyond_the_epoch_is_a_config_error(tmp_path):
    """Lightning refuses it before the first step; the user gets one line naming the config key."""
    from id2face.errors import UserError

    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=2", "data.batch_size=2",
                                 "data.dataset.params.num_identities=4", "data.dataset.params.samples_per_identity=2",
                                 "trainer.val_check_interval=50"])
    with pytest.raises(UserError, match=r"val_check_interval.*\(config key: trainer.val_check_interval\)") as err:
        fit(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=bogus",
     r"^trainer: Precision 'bogus' is invalid\. Allowed .*bf16-mixed.*\(config section: trainer\)$"),
    ("trainer.max_epochs=-3", r"^trainer: `max_epochs` must be a non-negative integer or -1"),
    ("model.optim.lr=-1", r"^model\.optim: Invalid learning rate: -1\.0 \(lr=-1, betas=\[0\.9, 0\.999\]"),
    ("model.optim.betas=[0.9]", r"^model\.optim: .*\(lr=.*, betas=\[0\.9\], weight_decay="),
    ("model.optim.ema_decay=2", r"^model\.optim\.ema_decay must be in \[0, 1\] and ema_every >= 1 .*got 2\.0 and"),
    ("model.loss.id_dropout=1.5", r"^model\.loss: id_dropout is a probability, in \[0, 1\]; got 1\.5$"),
    ("model.loss.identity_region=null",
     r"^model\.loss: loss weights are numbers >= 0; got \{'identity_region': None\}$"),
    ("model.loss.alignment=-0.1", r"^model\.loss: loss weights are numbers >= 0; got \{'alignment': -0\.1\}$"),
])
def test_a_setting_lightning_or_torch_refuses_is_one_line_and_leaves_no_run_folder(tmp_path, override, message):
    from id2face.errors import UserError

    cfg = load_config(["tiny"], [f"run.root={tmp_path}", *FAST, override])
    with pytest.raises(UserError, match=message) as err:
        fit(cfg)
    assert "\n" not in str(err.value)
    assert not run_dir(cfg).exists()


def test_resuming_a_checkpoint_of_another_model_is_one_line_and_keeps_the_runs_config(tmp_path):
    from id2face.errors import UserError

    base = [f"run.root={tmp_path}", *FAST, "run.checkpoint_every_n_steps=1"]
    folder = fit(load_config(["tiny"], [*base, "trainer.max_steps=1"]))
    saved, checkpoint = (folder / "config.yaml").read_text(), (folder / "checkpoints" / "last.ckpt").read_bytes()
    changed = load_config(["tiny"], [*base, "trainer.max_steps=2", "model.id_vae.params.latent_dim=8"])
    with pytest.raises(UserError, match=r"holds a run \(last\.ckpt\) of another config: model\.id_vae\.params\."
                                        r"latent_dim: 16 -> 8; .*--no-resume") as err:
        fit(changed)
    assert "\n" not in str(err.value)
    assert (folder / "config.yaml").read_text() == saved  # it still describes the checkpoint
    assert (folder / "checkpoints" / "last.ckpt").read_bytes() == checkpoint
    (folder / "config.yaml").unlink()  # without it, loading the weights is what finds the change
    with pytest.raises(UserError, match=r"last\.ckpt is a checkpoint of another model than this config describes "
                                        r"\(size mismatch for model\.id_vae\..*--no-resume"):
        fit(changed)
    assert state(fit(changed, resume=False))["global_step"] == 2


@pytest.mark.parametrize("layers, overrides, said", [
    ([], ["model.optim.lr=1e-5"], "model.optim.lr: 0.0003 -> 1e-05"),  # the optimiser's state would keep the old one
    (["ablations/prediction_v.yaml"], ["run.ablation=base"], "prediction_type: 'epsilon' -> 'v_prediction'"),
])
def test_resuming_with_a_config_that_computes_something_else_is_refused(tmp_path, capsys, layers, overrides, said):
    from id2face.cli import main

    base = ["tiny", f"run.root={tmp_path}", *FAST, "trainer.max_steps=1", "run.log_images_every_n_steps=0"]
    assert main(["train", *base]) == 0
    folder = tmp_path / "tiny" / "base" / "seed0"
    saved = (folder / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["train", *base[:1], *layers, *base[1:], "trainer.max_steps=2", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err and str(folder) in err
    assert (folder / "config.yaml").read_text() == saved and state(folder)["global_step"] == 1
    # what changes how long and how fast it runs, not what it computes, resumes
    assert main(["train", *base, "trainer.max_steps=2", "data.num_workers=1", "eval.limit=4"]) == 0
    assert state(folder)["global_step"] == 2


def test_a_split_file_the_config_names_is_the_split_training_uses(tmp_path):
    """data.split_file (a split runs share) was overridden by the run folder's own split.json."""
    import dataclasses

    from id2face.data.pairs import split_identities
    from id2face.registry import DATASETS

    base = [f"run.root={tmp_path}", *FAST, "trainer.max_steps=1"]
    cfg = load_config(["tiny"], base)
    labels = DATASETS.build(cfg.data.dataset, image_size=cfg.data.image_size).identity_labels
    made = split_identities(labels, cfg.data.split_fractions, cfg.data.split_seed)
    # What the run would draw itself, with val and test exchanged: valid for the data, and told apart.
    shared = dataclasses.replace(made, val=made.test, test=made.val).save(tmp_path / "shared_split.json")
    seen = {}

    class RecordTestSplit(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["test"] = trainer.datamodule.split.test.tolist()

    folder = fit(load_config(["tiny"], [*base, f"data.split_file={shared}"]), callbacks=[RecordTestSplit()])
    assert seen["test"] == made.val.tolist() != made.test.tolist()
    assert not (folder / "split.json").exists()


def test_an_unreadable_image_met_in_a_loader_worker_is_one_line(tmp_path, capsys):
    """torch re-raises a worker's exception as its type with the worker's traceback for message;
    the CLI prints the original message."""
    from PIL import Image

    from id2face.cli import main

    for identity in range(8):
        folder = tmp_path / "faces" / f"person{identity}"
        folder.mkdir(parents=True)
        for view in range(3):
            Image.new("RGB", (40, 40), (30 * identity, 8 * view, 90)).save(folder / f"{view}.png")
    broken = tmp_path / "faces" / "person2" / "1.png"
    broken.write_bytes(b"not a png")
    code = main(["train", "tiny", f"run.root={tmp_path / 'runs'}", "data.batch_size=2", "data.num_workers=1",
                 "trainer.max_steps=20", "trainer.limit_val_batches=0", "trainer.val_check_interval=5",
                 f"data.dataset={{name: identity_folder, params: {{root: {tmp_path / 'faces'}}}}}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (f"id2face train: error: identity_folder: {broken}: not an image file (text content: "
                                     "'not a png') (not_an_image); `id2face prepare` screens and reports such files")
    assert not any("Traceback" in line for line in err)


def test_cli_train_with_a_refused_setting_exits_2_on_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "id2face.cli", "train", "tiny", f"run.root={tmp_path}",
                          "trainer.precision=bf16-mixd"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("id2face train: error: trainer: Precision 'bf16-mixd'")
    assert list(tmp_path.iterdir()) == []


def test_out_of_gpu_memory_is_one_line_naming_the_keys_that_lower_it(tmp_path):
    from id2face.errors import UserError

    class OutOfMemoryAtStep2(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                             "capacity of 39.38 GiB\nof which 1.2 GiB is free.")

    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=4", "trainer.precision=bf16-mixed", *FAST])
    with pytest.raises(UserError) as err:
        fit(cfg, callbacks=[OutOfMemoryAtStep2()])
    message = str(err.value)
    assert "\n" not in message and "at step 2 with data.batch_size=2 pairs" in message
    assert "(CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 39.38 GiB)" in message
    assert "low_precision_norms=true" in message and "gradient_checkpointing=true" in message
    assert "train_step.py --memory" in message
    assert state(run_dir(cfg))["status"] == "failed: out of GPU memory"


def test_a_half_precision_unet_is_refused_for_training_before_anything_is_written(tmp_path):
    from id2face.errors import UserError

    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "model.backbone.params.dtype=bfloat16"])
    with pytest.raises(UserError, match="is for sampling .* use trainer.precision=bf16-mixed"):
        fit(cfg)
    assert not any(tmp_path.iterdir())


def test_a_cache_dir_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    fit(load_config(["tiny"], [f"run.root={tmp_path / 'runs'}", "trainer.max_steps=1", *FAST]))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.slow
def test_compiled_kernels_are_cached_beside_the_runs(tmp_path, monkeypatch, fresh_dynamo):
    """A requeued run on another node finds them on the shared file system (~70 s: one CPU compile)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # conftest restores it
    root = tmp_path / "runs"
    fit(load_config(["tiny"], [f"run.root={root}", "trainer.max_steps=1", "model.backbone.params.compile=true", *FAST]))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str((root / ".torchinductor").resolve())
    cached = [p for p in (root / ".torchinductor").rglob("*") if p.is_file()]
    assert len(cached) > 10 and any("fxgraph" in str(p) for p in cached)


def test_training_loop_reads_device_values_only_at_logging_steps(tmp_path):
    """Issue #8: a value read back to the host (``.item()``, ``bool(t)``, ``nonzero``) waits for the GPU
    queue to drain. The whole Lightning loop (progress bar, gradient clipping, EMA, our callbacks)
    may read back only at ``trainer.log_every_n_steps``; on this CPU every read is visible to a
    dispatch mode. AdamW's own reads are of its step counters, host tensors unless it is fused."""
    import traceback

    import lightning as L
    from torch.utils._python_dispatch import TorchDispatchMode

    reads_back = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                  torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
                  torch.ops.aten.masked_select.default}
    reads: dict[int, list[str]] = {}
    global_step = [-1]

    class RecordReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads_back:
                # Innermost first, past torch's wrappers (the whole step runs inside optimizer.step's
                # closure: only a read made by torch.optim's own code is the optimizer's).
                stack = [f for f in traceback.extract_stack()[-2::-1]
                         if not any(w in f.filename for w in ("_python_dispatch", "_dynamo", "torch/_compile.py",
                                                              "torch/_tensor.py"))]
                if "/torch/optim/" not in stack[0].filename:
                    reads.setdefault(global_step[0], []).append(" <- ".join(f"{f.filename}:{f.lineno}" for f in stack[:6]))
            return func(*args, **(kwargs or {}))

    mode = RecordReads()

    class DuringTraining(L.Callback):
        # From the first batch on: the data loader's sampler draws its seed from a host generator.
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if global_step[0] < 0:
                mode.__enter__()
            global_step[0] = trainer.global_step

        def on_train_end(self, trainer, pl_module):
            mode.__exit__(None, None, None)

    fit(load_config(["tiny"], [f"run.root={tmp_path}", "trainer.max_steps=8", *FAST, "trainer.log_every_n_steps=4",
                               "trainer.enable_progress_bar=true", "trainer.gradient_clip_val=1.0"]),
        callbacks=[DuringTraining()])
    assert global_step[0] == 7
    assert sorted(reads) == [3, 7], "\n".join(f"step {s}: {w}" for s, where in reads.items() for w in where[:3])
