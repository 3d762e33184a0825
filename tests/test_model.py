"""ID2Face composition: build, training losses, inference (anonymize / reconstruct / log_images), overfit."""
import time

import pytest
import torch
from torch.utils.data import default_collate

from id2face.components.backbone import PREDICTION_TYPES
from id2face.config import load_config
from id2face.model import (FROZEN_ROLES, ID2Face, IdentityTokens, build_components, count_parameters,
                           speed_switch_overrides)
from id2face.registry import GUIDANCES, MODEL_ROLES

pytestmark = pytest.mark.filterwarnings("ignore:tiny identity encoder has no weights")


def pair_batch(num_pairs=2, size=32, first_identity=0):
    """A SynthFaces pair batch: samples 0 and 1 of consecutive identities."""
    from id2face.data.synthfaces import render_sample

    ids = range(first_identity, first_identity + num_pairs)
    return {side: default_collate([render_sample(i, sample, size) for i in ids]) for side, sample in (("a", 0), ("b", 1))}


def tiny_model(*overrides, seed=0, files=()):
    torch.manual_seed(seed)
    return ID2Face.from_config(load_config(["tiny", *files], list(overrides)).model)



@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def batch():
    return pair_batch()


def test_build_components_gives_every_role_and_the_token_mlp():
    components = build_components(load_config(["tiny"]).model)
    assert list(components) == [*MODEL_ROLES, "identity_tokens"]
    for role in FROZEN_ROLES:
        assert count_parameters(components[role])[0] == 0
    trainable, total = count_parameters(components["backbone"])
    assert trainable == total > 100_000
    # The harmonizer was installed: the gated variant owns one gate per cross-attention layer.
    assert len(components["harmonizer"].gates) == sum(
        name.endswith("attn2.processor") for name in components["backbone"].unet.attn_processors)
    assert components["harmonizer"].registered_name == "gated"


def test_speed_switches_go_to_the_roles_whose_variants_declare_them():
    assert speed_switch_overrides(load_config(["tiny"]).model) == [  # pixel first stage: nothing to switch
        "model.backbone.params.channels_last=true", "model.backbone.params.compile=true"]
    assert speed_switch_overrides(load_config([]).model, ("compile",)) == [
        "model.first_stage.params.compile=true", "model.backbone.params.compile=true"]
    # variants that take **kwargs (e.g. guidance none) are not said to declare a switch
    assert not MODEL_ROLES["guidance"].declares("none", "compile")
    assert MODEL_ROLES["first_stage"].declares("sd_vae", "channels_last")


def test_a_bf16_unet_takes_the_harmonizer_gates_along_and_samples_like_bf16_autocast(batch):
    """The gates run inside the UNet on its hidden states: the same dtype. Sampling with bf16
    weights lands as close to fp32 as bf16 autocast does, and returns fp32."""
    low = tiny_model("model.backbone.params.dtype=bfloat16").eval()
    assert {p.dtype for p in low.harmonizer.parameters()} == {torch.bfloat16} and len(low.harmonizer.gates) > 0
    assert {p.dtype for p in low.id_vae.parameters()} == {torch.float32}  # identities stay fp32
    reference = tiny_model().eval()
    a = batch["a"]

    def anonymize(model):
        return model.anonymize(a["image"], a["mask"], generator=torch.Generator().manual_seed(0),
                               num_inference_steps=4)

    with torch.no_grad():
        expected, result = anonymize(reference), anonymize(low)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = anonymize(reference).float()
    assert result.dtype == torch.float32 and not torch.equal(result, expected)
    assert (result - expected).abs().mean() < 1.5 * (mixed - expected).abs().mean()


def test_count_parameters_counts_shared_tensors_once():
    linear = torch.nn.Linear(3, 4)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    module = torch.nn.ModuleDict({"a": linear, "b": linear, "c": frozen})
    assert count_parameters(module) == (16, 22)


def test_loss_weights_take_numbers_written_as_strings_and_refuse_negatives_and_nulls():
    from id2face.registry import ComponentValueError

    assert tiny_model("model.loss.alignment='1e-3'").loss_weights["alignment"] == 1e-3
    with pytest.raises(ComponentValueError, match=r"^model\.loss: loss weights are numbers >= 0; got "
                                                  r"\{'id_vae': -1, 'alignment': None\}$"):
        tiny_model("model.loss.id_vae=-1", "model.loss.alignment=null")


def test_training_losses_are_finite_and_reach_every_trainable_component(model, batch):
    model.train()
    model.zero_grad()
    losses = model.training_losses(batch)
    for key in ("loss", "diffusion", "diffusion_a", "diffusion_b", "id_vae", "alignment"):
        assert losses[key].ndim == 0 and torch.isfinite(losses[key]), key
    w = model.loss_weights
    expected = w["diffusion"] * losses["diffusion"] + w["id_vae"] * losses["id_vae"] + w["alignment"] * losses["alignment"]
    torch.testing.assert_close(losses["loss"].detach(), expected)
    torch.testing.assert_close(losses["diffusion"], 0.5 * (losses["diffusion_a"] + losses["diffusion_b"]))
    losses["loss"].backward()
    for role in ("backbone", "harmonizer", "attribute_encoder", "id_vae"):
        params = [p for p in getattr(model, role).parameters()]
        assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), role
    assert model.identity_tokens.mlp[0].weight.grad.abs().sum() > 0
    for role in FROZEN_ROLES:
        assert all(p.grad is None for p in getattr(model, role).parameters())


def test_frozen_components_stay_in_eval_mode(model):
    model.train()
    assert not model.identity_encoder.training and not model.first_stage.training
    assert model.backbone.training


def test_alignment_decides_which_identity_conditions_each_image(batch):
    """With bidirectional alignment, A's reconstruction depends on B's identity and not on A's own."""
    model = tiny_model("model.loss.id_dropout=0.0").eval()
    captured = []
    model.identity_tokens.register_forward_hook(lambda m, inp, out: captured.append(inp[0].detach()))
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 200, 300, 400])
    model.training_losses(batch, noise=noise, timesteps=t)
    mu_a = model.id_vae.encode(model.identity_embedding(batch["a"]["image"]))
    mu_b = model.id_vae.encode(model.identity_embedding(batch["b"]["image"]))
    torch.testing.assert_close(captured[0], torch.cat([mu_b, mu_a]))


def test_fixed_noise_and_timesteps_make_the_eval_loss_deterministic(model, batch):
    model.eval()
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 300, 600, 900])
    with torch.no_grad():
        first = model.training_losses(batch, noise=noise, timesteps=t)["diffusion"]
        second = model.training_losses(batch, noise=noise, timesteps=t)["diffusion"]
        other = model.training_losses(batch, noise=noise, timesteps=t.flip(0))["diffusion"]
    assert first == second and first != other


def test_identity_dropout_replaces_tokens_by_the_null_set():
    tokens_module = IdentityTokens(latent_dim=8, context_dim=16, num_tokens=3, hidden_dim=12)
    tokens = tokens_module(torch.randn(64, 8))
    assert tokens.shape == (64, 3, 16)
    assert torch.equal(tokens_module.drop(tokens, 0.0), tokens)
    dropped = tokens_module.drop(tokens, 1.0)
    assert torch.equal(dropped, tokens_module.null_tokens.expand(64, -1, -1))
    half = tokens_module.drop(tokens, 0.5, generator=torch.Generator().manual_seed(0))
    is_null = (half == tokens_module.null_tokens).all(-1).all(-1)
    assert 10 < int(is_null.sum()) < 54


def fixed_diffusion_loss(model, batch, noise, timesteps) -> float:
    """The diffusion loss at fixed noise and timesteps, in eval mode (no dropout of the identity)."""
    model.eval()
    with torch.no_grad():
        value = float(model.training_losses(batch, noise=noise, timesteps=timesteps)["diffusion"])
    model.train()
    return value


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_prediction_type_trains(prediction_type, batch):
    """A few AdamW steps on one batch lower the fixed-noise loss, with every regression target."""
    model = tiny_model(f"model.scheduler.params.prediction_type={prediction_type}", "model.loss.id_dropout=0.0")
    assert model.scheduler.prediction_type == prediction_type
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 300, 500, 700])

    def fixed_loss():
        return fixed_diffusion_loss(model, batch, noise, t)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = fixed_loss()
    for _ in range(4):
        optimizer.zero_grad()
        model.training_losses(batch, noise=noise, timesteps=t)["loss"].backward()
        optimizer.step()
    assert fixed_loss() < 0.7 * before


def test_anonymize_keeps_the_outside_exactly_and_changes_the_inside(model, batch):
    model.eval()
    images, masks = batch["a"]["image"], batch["a"]["mask"]
    out = model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    outside = masks.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])
    inside = ~outside
    assert (out[inside] - images[inside]).abs().mean() > 0.05
    again = model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    other = model.anonymize(images, masks, generator=torch.Generator().manual_seed(1), num_inference_steps=2)
    assert torch.equal(out, again)
    assert (out[inside] - other[inside]).abs().mean() > 1e-3


def test_anonymize_makes_the_substitute_orthogonal_to_the_fp32_source_under_bf16_autocast(model, batch, monkeypatch):
    """Sampling runs under the checkpoint's autocast; the identities stay fp32 (README), or the
    substitute is orthogonal only to a bf16 approximation of the source."""
    model.eval()
    images, masks = batch["a"]["image"], batch["a"]["mask"]
    seen = []
    mapping = model.id_mapping.forward

    def spy(source, *args, **kwargs):
        pseudo = mapping(source, *args, **kwargs)
        seen.append((source.dtype, pseudo.float()))
        return pseudo

    monkeypatch.setattr(model.id_mapping, "forward", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=1)
    (dtype, pseudo), = seen
    exact = model.identity_latent(images)
    assert dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(pseudo.double(), exact.double(), dim=-1).abs().max() < 1e-5


def test_reconstruct_keeps_the_outside_exactly(model, batch):
    model.eval()
    images, masks = batch["b"]["image"], batch["b"]["mask"]
    out = model.reconstruct(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=2)
    outside = masks.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside]) and not torch.equal(out, images)


@pytest.mark.parametrize("name", GUIDANCES.names())
def test_guidance_batches_every_condition_in_one_pass_of_its_unet_copies(name, batch):
    """negative: (pseudo, source), cfg: (pseudo, unconditional), none: pseudo alone; `unet_copies`
    (what the sampling benchmarks count) says how many."""
    model = tiny_model(f"model.guidance.name={name}").eval()
    batch_sizes = []
    model.backbone.register_forward_hook(lambda m, inp, out: batch_sizes.append(inp[0].shape[0]))
    images, masks = batch["a"]["image"], batch["a"]["mask"]
    out = model.anonymize(images, masks, generator=torch.Generator().manual_seed(0), num_inference_steps=3)
    assert batch_sizes == [2 * model.guidance.unet_copies] * 3  # 3 steps, each one forward over 2 images' conditions
    outside = masks.expand_as(images) == 0
    assert torch.equal(out[outside], images[outside])


def test_log_images_returns_grids_in_unit_range(model, batch):
    model.eval()
    grids = model.log_images(batch, num_inference_steps=2)
    assert set(grids) == {"source", "masked", "recomposed", "anonymized"}
    for name, grid in grids.items():
        assert grid.ndim == 3 and grid.shape[0] == 3 and 0 <= grid.min() and grid.max() <= 1, name
    assert grids["source"].shape == grids["anonymized"].shape
    assert not torch.equal(grids["source"], grids["anonymized"])


TOY_SD_VAE = """
model:
  first_stage:
    name: sd_vae
    params:
      random_init: true
      config: {block_out_channels: [8, 16], down_block_types: [DownEncoderBlock2D, DownEncoderBlock2D],
               up_block_types: [UpDecoderBlock2D, UpDecoderBlock2D], layers_per_block: 1, norm_num_groups: 4}
  scheduler:
    params:
      clip_sample: false
"""


def test_latent_first_stage_path_trains_and_samples(batch, tmp_path):
    """sd_vae (toy width, random init): 4 latent channels at 1/2 size, UNet input 2*4+1 = 9."""
    layer = tmp_path / "toy_sd_vae.yaml"
    layer.write_text(TOY_SD_VAE)
    model = tiny_model(files=[str(layer)])
    assert model.backbone.unet.config.in_channels == 9
    masked, latent_masks = model.inpainting_condition(batch["a"]["image"], batch["a"]["mask"])
    assert masked.shape == (2, 4, 16, 16) and latent_masks.shape == (2, 1, 16, 16)
    # A latent cell is masked when any pixel under it is.
    torch.testing.assert_close(latent_masks, torch.nn.functional.max_pool2d(batch["a"]["mask"], 2))
    losses = model.training_losses(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    model.eval()
    out = model.anonymize(batch["a"]["image"], batch["a"]["mask"], generator=torch.Generator().manual_seed(0),
                          num_inference_steps=2)
    outside = batch["a"]["mask"].expand_as(out) == 0
    assert torch.equal(out[outside], batch["a"]["image"][outside])


def test_overfit_one_synthfaces_batch_halves_the_diffusion_loss():
    """30 AdamW steps on 2 fixed SynthFaces pairs: the noise-and-timestep-fixed diffusion loss
    (measured in eval mode, before and after) falls by at least 50%."""
    from id2face.data.synthfaces import SynthFaces

    model = tiny_model("model.loss.id_dropout=0.0", seed=0)
    data = SynthFaces(image_size=32, num_identities=2, samples_per_identity=2)
    batch = {"a": default_collate([data[0], data[2]]), "b": default_collate([data[1], data[3]])}
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 300, 500, 700])

    def fixed_loss():
        return fixed_diffusion_loss(model, batch, noise, t)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    before, start = fixed_loss(), time.perf_counter()
    for _ in range(30):  # fresh noise and timesteps each step: it must learn the batch, not one noise draw
        optimizer.zero_grad()
        model.training_losses(batch, generator=generator)["loss"].backward()
        optimizer.step()
    after = fixed_loss()
    print(f"overfit: fixed-noise diffusion loss {before:.4f} -> {after:.4f} ({after / before:.1%}) "
          f"in 30 steps, {time.perf_counter() - start:.1f} s")
    assert after <= 0.5 * before


def test_identity_region_weight_moves_the_loss_towards_the_masked_region(batch):
    """With weight w on the identity region the loss is the w-weighted mean of the per-pixel errors;
    w = 1 is the plain mean."""
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 300, 500, 700])
    plain = tiny_model("model.loss.id_dropout=0.0")
    heavy = tiny_model("model.loss.id_dropout=0.0", "model.loss.identity_region=9.0")
    heavy.load_state_dict(plain.state_dict())
    plain_loss, heavy_loss = fixed_diffusion_loss(plain, batch, noise, t), fixed_diffusion_loss(heavy, batch, noise, t)

    # the same two numbers by hand: mean error inside and outside the mask
    images = torch.cat([batch["a"]["image"], batch["b"]["image"]])
    masks = torch.cat([batch["a"]["mask"], batch["b"]["mask"]])
    plain.eval()
    with torch.no_grad():
        model = plain
        e = model.identity_embedding(images)
        attr = model.attribute_encoder(images, masks)
        e_a, e_b = e.chunk(2)
        lat_a, lat_b = model.id_vae(e_a), model.id_vae(e_b)
        aligned = model.alignment(lat_a, lat_b, e_a, e_b, *attr.chunk(2))
        context = torch.cat([model.identity_tokens(torch.cat([aligned.id_for_a, aligned.id_for_b])), attr], 1)
        masked_latents, latent_masks = model.inpainting_condition(images, masks)
        latents = model.first_stage.encode(images)
        error = (model.denoise(model.scheduler.add_noise(latents, noise, t), t, masked_latents, latent_masks, context)
                 - model.scheduler.target(latents, noise, t)).pow(2)
    region = latent_masks.expand_as(error)
    inside, outside = (error * region).flatten(1).sum(1), (error * (1 - region)).flatten(1).sum(1)
    n_in, n_out = region.flatten(1).sum(1), (1 - region).flatten(1).sum(1)
    expected_plain = ((inside + outside) / (n_in + n_out)).mean()
    expected_heavy = ((9 * inside + outside) / (9 * n_in + n_out)).mean()
    assert plain_loss == pytest.approx(float(expected_plain), rel=1e-4)
    assert heavy_loss == pytest.approx(float(expected_heavy), rel=1e-4)
    assert abs(heavy_loss - plain_loss) > 1e-4
