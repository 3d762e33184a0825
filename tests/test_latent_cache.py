"""Precomputed frozen features (`id2face cache-latents`, `data.latent_cache`): first-stage latents
and identity embeddings give the same losses without the encodes, only where the pixels are the
cached ones; refused when made for other data or another first stage, and the embeddings served
only to the identity encoder that made them."""
import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from id2face.cli import main
from id2face.config import load_config
from id2face.data.datamodule import FacePairDataModule
from id2face.data.datasets import IdentityFolder
from id2face.data.latent_cache import (CACHED_KEYS, CachedLatents, LatentCache, collate_pairs,
                                       weights_fingerprint, write_latent_cache)
from id2face.data.pairs import PairDataset
from id2face.data.synthfaces import SynthFaces, render_sample
from id2face.errors import UserError
from id2face.model import ID2Face

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights")

TOY_SD_VAE = ["model.first_stage.name=sd_vae", "model.first_stage.params.random_init=true",
              "model.first_stage.params.config={block_out_channels: [8, 16], "
              "down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D], "
              "up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D], layers_per_block: 1, norm_num_groups: 4}"]
SMALL_DATA = ["data.dataset.params.num_identities=6", "data.dataset.params.samples_per_identity=4",
              "data.batch_size=4"]


def tiny_model(*overrides, seed=0):
    torch.manual_seed(seed)
    return ID2Face.from_config(load_config(["tiny"], list(overrides)).model)


def pair_batch(num_pairs=3):
    return {side: default_collate([render_sample(i, sample, 32) for i in range(num_pairs)])
            for side, sample in (("a", 0), ("b", 1))}


def with_cached(model, batch, sides=("a", "b"), identity_sides=()):
    """The batch with float16 cached latents on ``sides`` and identity embeddings on
    ``identity_sides`` (what cache rows hold)."""
    out = {side: dict(items) for side, items in batch.items()}
    for side in sides:
        latents, masked = model.first_stage_latents(batch[side]["image"], batch[side]["mask"])
        out[side].update(latent=latents.half(), masked_latent=masked.half())
    for side in identity_sides:
        out[side]["identity_embedding"] = model.identity_embedding(batch[side]["image"])
    return out


def fixed_losses(model, batch, shape):
    n = 2 * batch["a"]["image"].shape[0]
    g = torch.Generator().manual_seed(0)
    noise, timesteps = torch.randn(n, *shape, generator=g), torch.randint(0, 1000, (n,), generator=g)
    model.eval()  # no identity dropout: the two runs see the same conditions
    return model.training_losses(batch, noise=noise, timesteps=timesteps)


@pytest.mark.parametrize("first_stage", [[], TOY_SD_VAE], ids=["pixel", "sd_vae"])
def test_cached_features_give_the_encoded_losses_without_encoding(first_stage, monkeypatch):
    model = tiny_model(*first_stage)
    batch = pair_batch()
    cached = with_cached(model, batch, identity_sides=("a", "b"))
    shape = cached["a"]["latent"].shape[1:]
    expected = fixed_losses(model, batch, shape)
    half_cached = fixed_losses(model, with_cached(model, batch, sides=("b",), identity_sides=("a",)), shape)
    monkeypatch.setattr(model.first_stage, "encode", lambda x: pytest.fail("a cached side was encoded"))
    monkeypatch.setattr(model.identity_encoder, "forward", lambda x: pytest.fail("a cached side was embedded"))
    got = fixed_losses(model, cached, shape)
    for key in ("alignment", "id_vae"):  # the embeddings' consumers: same inputs, same values
        torch.testing.assert_close(got[key], expected[key])
    for losses in (half_cached, got):
        for key in ("loss", "diffusion_a", "diffusion_b"):  # float16 storage: ~1e-3 relative
            torch.testing.assert_close(losses[key], expected[key], rtol=5e-3, atol=1e-5)
    got["loss"].backward()  # the graph is the same one: every trainable part gets its gradient
    assert model.backbone.unet.conv_in.weight.grad.abs().sum() > 0


def cache_args(folder, *overrides):
    return ["cache-latents", "tiny", *SMALL_DATA, *overrides, "-o", str(folder), "--device", "cpu"]


def test_cache_command_stores_the_frozen_features_that_training_batches_carry(tmp_path, capsys):
    folder = tmp_path / "cache"
    assert main(cache_args(folder, *TOY_SD_VAE)) == 0
    assert f"data.latent_cache={folder}" in capsys.readouterr().out
    cache = LatentCache(folder)
    meta = json.loads((folder / "meta.json").read_text())
    assert len(cache) == 24 and meta["latent_shape"] == [4, 16, 16] and meta["first_stage"]["name"] == "sd_vae"
    # Built as `id2face train` builds it (seeded with run.seed): the same random-init first stage.
    cfg = load_config(["tiny"], [*SMALL_DATA, *TOY_SD_VAE])
    model = tiny_model(*SMALL_DATA, *TOY_SD_VAE, seed=int(cfg.run.seed))
    cache.check_first_stage(model.first_stage)
    assert "identity_embedding" not in cache[0]  # served only once the encoder that made them is seen
    assert cache.serve_identity_to(model.identity_encoder)
    assert meta["identity_dim"] == model.identity_encoder.embed_dim and meta["identity_encoder"]["name"] == "tiny"
    dataset = SynthFaces(image_size=32, num_identities=6, samples_per_identity=4)
    for i in (0, 13, 23):
        torch.testing.assert_close(cache[i]["identity_embedding"], model.identity_embedding(dataset[i]["image"][None])[0])
        latents, masked = model.first_stage_latents(dataset[i]["image"][None], dataset[i]["mask"][None])
        torch.testing.assert_close(cache[i]["latent"].float(), latents[0], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(cache[i]["masked_latent"].float(), masked[0], rtol=2e-3, atol=2e-3)
        assert not torch.equal(cache[i]["latent"], cache[i]["masked_latent"])  # the identity region differs

    datamodule = FacePairDataModule(load_config(["tiny"], [*SMALL_DATA, f"data.latent_cache={folder}"]).data)
    datamodule.latent_cache.serve_identity_to(model.identity_encoder)  # what the LightningModule's setup does
    batch = next(iter(datamodule.train_dataloader()))
    for side in ("a", "b"):  # every identity has 4 images: real partners, all cached
        assert batch[side]["latent"].shape == (4, 4, 16, 16) and batch[side]["latent"].dtype == torch.float16
        assert batch[side]["identity_embedding"].shape == (4, model.identity_encoder.embed_dim)
    losses = model.training_losses(batch)
    assert torch.isfinite(losses["loss"])
    assert "latent" not in datamodule.test_dataset[0]  # evaluation reads pixels only


def test_cache_encodes_in_the_precision_asked_and_records_it(tmp_path, capsys):
    """Default on a CPU: fp32. bf16-mixed: what a training step without a cache encodes in under
    trainer.precision=bf16-mixed (tensor cores on a GPU): the same latents to bf16's precision."""
    assert main(cache_args(tmp_path / "fp32", *TOY_SD_VAE)) == 0
    assert main(cache_args(tmp_path / "bf16", *TOY_SD_VAE, "--precision", "bf16-mixed")) == 0
    assert "cpu, bf16-mixed)" in capsys.readouterr().out
    fp32, bf16 = LatentCache(tmp_path / "fp32"), LatentCache(tmp_path / "bf16")
    assert json.loads((tmp_path / "fp32" / "meta.json").read_text())["precision"] == "32-true"
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["precision"] == "bf16-mixed"
    model = tiny_model(*SMALL_DATA, *TOY_SD_VAE)
    dataset = SynthFaces(image_size=32, num_identities=6, samples_per_identity=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_step, _ = model.first_stage_latents(dataset[5]["image"][None], dataset[5]["mask"][None])
    torch.testing.assert_close(bf16[5]["latent"].float(), in_step[0].float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bf16[5]["latent"].float(), fp32[5]["latent"].float(), rtol=5e-2, atol=5e-2)
    assert not torch.equal(bf16[5]["latent"], fp32[5]["latent"])


@pytest.mark.gpu
def test_cache_on_cuda_encodes_in_the_configs_training_precision(tmp_path):
    folder = tmp_path / "cache"
    assert main(["cache-latents", "tiny", *SMALL_DATA, *TOY_SD_VAE, "trainer.precision=bf16-mixed",
                 "-o", str(folder), "--device", "cuda"]) == 0
    assert json.loads((folder / "meta.json").read_text())["precision"] == "bf16-mixed"
    assert len(LatentCache(folder)) == 24


def test_augmented_partners_are_encoded_and_real_ones_read_from_the_cache(tmp_path):
    """One image per identity: every partner is an augmented view, i.e. new pixels."""
    data = ["data.dataset.params.num_identities=8", "data.dataset.params.samples_per_identity=1"]
    folder = tmp_path / "cache"
    assert main(["cache-latents", "tiny", *data, "-o", str(folder), "--device", "cpu"]) == 0
    cache = LatentCache(folder)
    cache.serve_identity = True
    dataset = CachedLatents(SynthFaces(image_size=32, num_identities=8, samples_per_identity=1), cache)
    pairs = PairDataset(dataset)
    assert set(CACHED_KEYS) <= set(pairs[0]["a"]) and not set(CACHED_KEYS) & set(pairs[0]["b"])
    batch = collate_pairs([pairs[i] for i in range(4)])
    assert "latent" in batch["a"] and "latent" not in batch["b"]
    # A side keeps cached latents only when all its items have them.
    mixed = collate_pairs([{"a": pairs[0]["a"]}, {"a": pairs[1]["b"]}])
    assert not set(CACHED_KEYS) & set(mixed["a"]) and mixed["a"]["image"].shape == (2, 3, 32, 32)
    assert torch.isfinite(tiny_model().training_losses(batch)["loss"])


def test_a_cache_for_other_data_or_another_first_stage_is_refused(tmp_path, capsys):
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    cache = LatentCache(folder)
    with pytest.raises(UserError, match="other data"):
        CachedLatents(SynthFaces(image_size=32, num_identities=7, samples_per_identity=4), cache)
    with pytest.raises(UserError, match="other data"):
        CachedLatents(SynthFaces(image_size=32, num_identities=6, samples_per_identity=4, seed=1), cache)
    with pytest.raises(UserError, match="another first stage"):
        cache.check_first_stage(tiny_model(*TOY_SD_VAE).first_stage)
    assert weights_fingerprint(tiny_model(*TOY_SD_VAE, seed=1).first_stage) != \
        weights_fingerprint(tiny_model(*TOY_SD_VAE, seed=0).first_stage)

    # Training with it: one line on stderr, exit 2, before any step.
    capsys.readouterr()
    code = main(["train", "tiny", *SMALL_DATA, *TOY_SD_VAE, f"data.latent_cache={folder}",
                 f"run.root={tmp_path / 'runs'}", "trainer.max_steps=1", "trainer.enable_progress_bar=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("id2face train: error: latent cache") and "another first stage" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_identity_embeddings_of_another_encoder_are_not_served(tmp_path):
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    cache = LatentCache(folder)
    other = tiny_model("model.identity_encoder.params.width=8").identity_encoder
    assert not cache.serve_identity_to(other) and "identity_embedding" not in cache[0]
    assert cache.serve_identity_to(tiny_model().identity_encoder) and cache[0]["identity_embedding"].shape == (64,)
    # A cache made without an identity encoder: latents only, the step embeds.
    meta = json.loads((folder / "meta.json").read_text())
    del meta["identity_encoder_fingerprint"]
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "identity.npy").unlink()
    old = LatentCache(folder)
    assert not old.serve_identity_to(tiny_model().identity_encoder) and set(old[0]) == {"latent", "masked_latent"}


def test_identity_embeddings_are_served_only_to_an_encoder_that_preprocesses_alike(tmp_path):
    """input_size, mean and std are no weights: equal state dicts that see other pixels embed otherwise."""
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    cache = LatentCache(folder)
    made = tiny_model().identity_encoder
    at_64 = tiny_model("model.identity_encoder.params.input_size=64").identity_encoder
    assert weights_fingerprint(at_64) == weights_fingerprint(made)
    assert not cache.serve_identity_to(at_64) and "identity_embedding" not in cache[0]
    other_std = tiny_model().identity_encoder
    other_std.std = (0.25, 0.25, 0.25)  # a class attribute of the contract, overridden as a subclass would
    assert not cache.serve_identity_to(other_std)
    assert cache.serve_identity_to(made)


def prepared_folder(root, face_scale=1.0, seed=0):
    """A folder as `id2face prepare` writes it: 3 identities x 2 crops of 32 px with their landmarks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({
        "format": 1, "size": 32, "face_scale": face_scale, "dataset": "identity_folder", "dataset_params": {},
        "multiple_faces": "largest", "min_score": 0.9, "detect_max_side": 1024, "min_face_size": 20,
        "max_pixels": 10**8, "input": str(root.parent / "photos")}))
    with open(root / "manifest.jsonl", "w") as manifest:
        for identity in range(3):
            for k in range(2):
                output = f"images/p{identity}/{k}.png"
                (root / output).parent.mkdir(exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / output)
                points = (16 + (rng.random((5, 2)) - 0.5) * 16 * face_scale).round(2).tolist()
                manifest.write(json.dumps({"source": f"p{identity}/{k}.jpg", "output": output, "status": "ok",
                                           "identity": f"p{identity}", "landmarks_crop": points}) + "\n")
    return root


def test_a_cache_for_other_crops_of_the_same_photos_is_refused_and_a_moved_dataset_keeps_it(tmp_path):
    """Two `prepare` runs of the same photos (another --face-scale, another face found) give the same
    crop names and labels but other pixels, template masks and landmarks: the cache of one is not the other's."""
    made = prepared_folder(tmp_path / "prepared")
    folder = tmp_path / "cache"
    assert main(["cache-latents", "tiny", f"data.dataset={{name: identity_folder, params: {{root: {made}}}}}",
                 "-o", str(folder), "--device", "cpu"]) == 0
    cache = LatentCache(folder)

    # Moved to scratch, with prepare.json's non-crop settings changed by a resumed run: still its cache.
    moved = shutil.copytree(made, tmp_path / "scratch" / "prepared")
    settings = json.loads((moved / "prepare.json").read_text())
    (moved / "prepare.json").write_text(json.dumps({**settings, "input": "/elsewhere", "max_pixels": 10**9}))
    CachedLatents(IdentityFolder(moved, image_size=32), cache)

    rescaled = shutil.copytree(made, tmp_path / "rescaled")  # crop settings alone (same files and landmarks)
    (rescaled / "prepare.json").write_text(json.dumps({**settings, "face_scale": 1.4}))
    relandmarked = shutil.copytree(made, tmp_path / "relandmarked")  # landmarks alone
    entries = [json.loads(line) for line in (relandmarked / "manifest.jsonl").read_text().splitlines()]
    entries[3]["landmarks_crop"][2][0] += 3.0
    (relandmarked / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    for other in (rescaled, relandmarked, prepared_folder(tmp_path / "again", face_scale=1.4, seed=1)):
        with pytest.raises(UserError, match="other data"):
            CachedLatents(IdentityFolder(other, image_size=32), cache)


def test_a_cache_of_the_older_format_is_refused_with_how_to_rebuild_it(tmp_path):
    """Its meta cannot tell other crops or another preprocessing apart: one line, rebuild it."""
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": "id2face-latent-cache/1"}))
    with pytest.raises(UserError, match=r"older format .*rebuild it.*`id2face cache-latents") as raised:
        LatentCache(folder)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("bad, said", [(["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
                                       (["data.num_workers=-1"], "data.num_workers takes a whole number >= 0"),
                                       (["--batch-size", "0"], "--batch-size must be >= 1, got 0")])
def test_bad_numbers_are_one_line_before_anything_is_written(tmp_path, capsys, bad, said):
    code = main([*cache_args(tmp_path / "cache"), *bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"id2face cache-latents: error: {said}")
    assert not any(tmp_path.iterdir())


def test_a_run_that_fails_midway_leaves_no_partial_folder(tmp_path):
    model = tiny_model()
    calls = []

    def encode_then_fail(images, masks):
        calls.append(len(images))
        if len(calls) == 2:  # after the first batch's rows are written
            raise RuntimeError("CUDA out of memory")
        return model.first_stage_latents(images, masks)

    with pytest.raises(RuntimeError, match="out of memory"):
        write_latent_cache(SynthFaces(image_size=32, num_identities=2, samples_per_identity=2), model.first_stage,
                           encode_then_fail, tmp_path / "cache", {}, batch_size=2, progress=False)
    assert calls == [2, 2] and not any(tmp_path.iterdir())


def test_unfinished_missing_and_existing_cache_folders(tmp_path, capsys):
    with pytest.raises(UserError, match="does not exist.*id2face cache-latents"):
        LatentCache(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    with pytest.raises(UserError, match="unfinished"):
        LatentCache(tmp_path / "half")
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    before = (folder / "latents.npy").read_bytes()
    capsys.readouterr()
    assert main(cache_args(folder)) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err and (folder / "latents.npy").read_bytes() == before


def test_the_memory_map_is_not_pickled_into_loader_workers(tmp_path):
    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    cache = LatentCache(folder)
    first = cache[0]["latent"]  # opens the map in this process
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 4096 < (folder / "latents.npy").stat().st_size
    assert torch.equal(clone[0]["latent"], first)
    assert isinstance(cache.rows, np.memmap)


@pytest.mark.parametrize("device", ["quantum", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="needs a machine without CUDA"))])
def test_a_device_that_cannot_run_is_one_line_before_any_work(tmp_path, capsys, device):
    code = main(["cache-latents", "tiny", "-o", str(tmp_path / "cache"), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"id2face cache-latents: error: --device {device}")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def test_training_reads_the_identity_embeddings_its_encoder_made(tmp_path, monkeypatch):
    """The LightningModule's setup turns the cached embeddings on: the steps never run the encoder."""
    import lightning as L

    from id2face.lit_module import ID2FaceModule

    folder = tmp_path / "cache"
    assert main(cache_args(folder)) == 0
    cfg = load_config(["tiny"], [*SMALL_DATA, f"data.latent_cache={folder}"])
    module = ID2FaceModule(cfg)
    datamodule = FacePairDataModule(cfg.data)
    monkeypatch.setattr(module.model.identity_encoder, "forward", lambda x: pytest.fail("a cached side was embedded"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule)
    assert datamodule.latent_cache.serve_identity and trainer.global_step == 2

    # Another identity encoder: one warning, and it embeds the images itself.
    other = ID2FaceModule(load_config(["tiny"], [*SMALL_DATA, f"data.latent_cache={folder}",
                                                 "model.identity_encoder.params.width=8"]))
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(UserWarning, match="made by another identity encoder"):
        trainer.fit(other, FacePairDataModule(cfg.data))
    assert trainer.global_step == 1


def test_training_without_a_cache_hints_at_one_where_the_first_stage_encodes(tmp_path, capsys):
    from id2face.training import latent_cache_hint

    assert latent_cache_hint(load_config(["tiny"]), tiny_model()) is None  # pixels: nothing to encode
    encoding = tiny_model(*TOY_SD_VAE)
    hint = latent_cache_hint(load_config(["tiny"], TOY_SD_VAE), encoding)
    assert "id2face cache-latents" in hint and "\n" not in hint
    assert latent_cache_hint(load_config(["tiny"], [*TOY_SD_VAE, "data.latent_cache=DIR"]), encoding) is None

    capsys.readouterr()
    assert main(["train", "tiny", *SMALL_DATA, *TOY_SD_VAE, f"run.root={tmp_path}", "trainer.max_steps=1",
                 "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0"]) == 0
    assert capsys.readouterr().err.count(hint) == 1
