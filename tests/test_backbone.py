"""First stages, UNet backbone, training scheduler and samplers (diffusers parts behind id2face names)."""
import pytest
import torch

from id2face.components.backbone import PREDICTION_TYPES, SD_VAE_CONFIG, DecoderSwap
from id2face.errors import MissingWeightsError, UserError
from id2face.registry import BACKBONES, FIRST_STAGES, SAMPLERS, SCHEDULERS

# The SD-1.5 VAE's structure at toy width: same code path, CPU-cheap.
TINY_VAE = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4)
# TAESD's structure at toy width, downscale 2 like TINY_VAE: it can decode TINY_VAE's latents.
TINY_TAESD = dict(encoder_block_out_channels=[8, 8], decoder_block_out_channels=[8, 8], num_encoder_blocks=[1, 1],
                  num_decoder_blocks=[1, 1])
FIRST_STAGE_PARAMS = {"pixel": {}, "sd_vae": {"random_init": True, "config": TINY_VAE},
                      "taesd": {"random_init": True, "config": TINY_TAESD}}
AUTOENCODERS = ("sd_vae", "taesd")
TINY_UNET = dict(sample_size=16, block_out_channels=[32, 64], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1, attention_head_dim=8)



def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_first_stage_params_cover_the_registry():
    assert sorted(FIRST_STAGE_PARAMS) == FIRST_STAGES.names()


@pytest.mark.parametrize("name", FIRST_STAGES.names())
def test_first_stage_contract(name):
    stage = FIRST_STAGES.build({"name": name, "params": FIRST_STAGE_PARAMS[name]})
    x = images()
    with torch.no_grad():
        latents = stage.encode(x)
        decoded = stage.decode(latents)
    f = stage.downscale
    assert latents.shape == (2, stage.latent_channels, 32 // f, 32 // f)
    assert decoded.shape == x.shape
    # Frozen: no trainable weights, and a parent's .train() does not switch it to training mode.
    assert not any(p.requires_grad for p in stage.parameters())
    stage.train()
    assert not stage.training and not any(m.training for m in stage.modules())


def test_pixel_first_stage_is_the_identity():
    stage = FIRST_STAGES.build("pixel")
    x = images()
    assert torch.equal(stage.decode(stage.encode(x)), x)
    assert (stage.latent_channels, stage.downscale) == (3, 1)


def test_sd_vae_scales_latents_and_round_trips_through_a_local_dir(tmp_path):
    stage = FIRST_STAGES.build({"name": "sd_vae", "params": FIRST_STAGE_PARAMS["sd_vae"]})
    assert stage.scaling_factor == SD_VAE_CONFIG["scaling_factor"] and stage.downscale == 2
    x = images()
    with torch.no_grad():
        raw = stage.vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(stage.encode(x), raw * stage.scaling_factor)
    stage.vae.save_pretrained(tmp_path / "vae")
    loaded = FIRST_STAGES.build({"name": "sd_vae", "params": {"path": str(tmp_path / "vae")}})
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), stage.encode(x))
        torch.testing.assert_close(loaded.decode(stage.encode(x)), stage.decode(stage.encode(x)))


def test_taesd_latents_are_its_own_and_round_trip_through_a_local_dir(tmp_path):
    stage = FIRST_STAGES.build({"name": "taesd", "params": FIRST_STAGE_PARAMS["taesd"]})
    assert (stage.scaling_factor, stage.shift_factor, stage.downscale) == (1.0, 0.0, 2)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(stage.encode(x), stage.vae.encode(x).latents)  # already in SD's scaled space
        torch.testing.assert_close(stage.decode(stage.encode(x)), stage.vae.decode(stage.vae.encode(x).latents).sample)
    stage.vae.save_pretrained(tmp_path / "taesd")
    loaded = FIRST_STAGES.build({"name": "taesd", "params": {"path": str(tmp_path / "taesd")}})
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(stage.encode(x)), stage.decode(stage.encode(x)))
    # the released TAESD's architecture: 8x downscale, 4 latent channels, ~1.2M parameters each way
    full = FIRST_STAGES.build({"name": "taesd", "params": {"random_init": True}})
    assert (full.downscale, full.latent_channels) == (8, 4)
    assert 1.1e6 < sum(p.numel() for p in full.vae.decoder.parameters()) < 1.3e6


def test_taesd_without_weights_names_the_path_and_the_source(tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere") as err:
        FIRST_STAGES.build({"name": "taesd", "params": {"path": str(tmp_path / "nowhere")}})
    assert "AutoencoderTiny" in str(err.value) and "madebyollin/taesd" in str(err.value)
    with pytest.raises(UserError, match="`config` only applies with `random_init: true`"):
        FIRST_STAGES.build({"name": "taesd", "params": {"path": str(tmp_path), "config": TINY_TAESD}})


def test_decoder_swap_encodes_with_one_stage_and_decodes_with_the_other():
    torch.manual_seed(0)
    vae = FIRST_STAGES.build({"name": "sd_vae", "params": FIRST_STAGE_PARAMS["sd_vae"]})
    tiny = FIRST_STAGES.build({"name": "taesd", "params": FIRST_STAGE_PARAMS["taesd"]})
    swap = DecoderSwap(vae, tiny)
    x = images()
    with torch.no_grad():
        latents = swap.encode(x)
        torch.testing.assert_close(latents, vae.encode(x))
        torch.testing.assert_close(swap.decode(latents), tiny.decode(latents))
        assert not torch.allclose(swap.decode(latents), vae.decode(latents))
    assert (swap.latent_channels, swap.downscale) == (4, 2)
    swap.train()
    assert not any(m.training for m in swap.modules()) and not any(p.requires_grad for p in swap.parameters())
    with pytest.raises(UserError, match=r"decoder's latent channels \(4\) differs from the first stage's \(3\)"):
        DecoderSwap(FIRST_STAGES.build("pixel"), tiny)
    with pytest.raises(UserError, match=r"decoder's downscale \(8\) differs from the first stage's \(2\)"):
        DecoderSwap(vae, FIRST_STAGES.build({"name": "taesd", "params": {"random_init": True}}))


def test_sd_vae_without_weights_names_the_path_and_the_source(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MissingWeightsError, match="nowhere") as err:
        FIRST_STAGES.build({"name": "sd_vae", "params": {"path": str(missing)}})
    assert "Stable Diffusion" in str(err.value) and "vae/" in str(err.value)
    with pytest.raises(MissingWeightsError):
        FIRST_STAGES.build({"name": "sd_vae", "params": {}})


def unet(params=None, in_channels=7, seed=0):
    torch.manual_seed(seed)
    return BACKBONES.build({"name": "unet", "params": {**TINY_UNET, **(params or {})}},
                           in_channels=in_channels, out_channels=3, cross_attention_dim=32)


def unet_inputs(in_channels=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, in_channels, 16, 16, generator=g), torch.tensor([3, 800]),
            torch.randn(2, 6, 32, generator=g))


BACKBONE_PARAMS = {"unet": TINY_UNET}


def test_backbone_params_cover_the_registry():
    assert sorted(BACKBONE_PARAMS) == BACKBONES.names()


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_contract_is_a_stock_unet_with_runtime_channels(name):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    backbone = BACKBONES.build({"name": name, "params": BACKBONE_PARAMS[name]}, in_channels=7, out_channels=3,
                               cross_attention_dim=32)
    assert type(backbone.unet) is UNet2DConditionModel  # what the harmonizer installs into
    assert (backbone.unet.config.in_channels, backbone.unet.config.out_channels,
            backbone.unet.config.cross_attention_dim) == (7, 3, 32)
    x, t, context = unet_inputs()
    out = backbone(x, t, context)
    assert out.shape == (2, 3, 16, 16)
    out.square().mean().backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


def test_unet_pretrained_dir_round_trips(tmp_path):
    source = unet(seed=5)
    source.unet.save_pretrained(tmp_path / "unet")
    loaded = BACKBONES.build({"name": "unet", "params": {"pretrained": str(tmp_path / "unet")}},
                             in_channels=7, out_channels=3, cross_attention_dim=32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*unet_inputs()), source(*unet_inputs()))


def test_text_to_image_unet_gets_zero_initialised_inpainting_channels(tmp_path):
    source = unet(in_channels=3, seed=5)  # a 3-channel "text-to-image" UNet
    source.unet.save_pretrained(tmp_path / "t2i")
    inpainting = BACKBONES.build({"name": "unet", "params": {"pretrained": str(tmp_path / "t2i")}},
                                 in_channels=7, out_channels=3, cross_attention_dim=32)
    assert inpainting.unet.config.in_channels == 7 and inpainting.unet.conv_in.in_channels == 7
    x, t, context = unet_inputs()
    with torch.no_grad():
        # The extra (masked-image, mask) channels start with zero weight: the original model's output.
        torch.testing.assert_close(inpainting(x, t, context), source(x[:, :3], t, context))


def test_pretrained_unet_errors(tmp_path):
    with pytest.raises(MissingWeightsError, match="unet/"):
        BACKBONES.build({"name": "unet", "params": {"pretrained": str(tmp_path / "none")}},
                        in_channels=7, out_channels=3, cross_attention_dim=32)
    unet().unet.save_pretrained(tmp_path / "u")
    with pytest.raises(UserError, match="context_dim=32"):
        BACKBONES.build({"name": "unet", "params": {"pretrained": str(tmp_path / "u")}},
                        in_channels=7, out_channels=3, cross_attention_dim=64)


def test_gradient_checkpointing_switch_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        backbone = unet({"gradient_checkpointing": checkpointing}, seed=2).train()
        assert backbone.unet.is_gradient_checkpointing == checkpointing
        backbone(*unet_inputs()).square().mean().backward()
        grads.append(backbone.unet.conv_in.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------ schedulers
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_training_scheduler_noise_and_target(name, prediction_type):
    sched = SCHEDULERS.build({"name": name, "params": {"prediction_type": prediction_type}})
    assert sched.prediction_type == prediction_type and sched.config.prediction_type == prediction_type
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    alpha_bar = sched.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.add_noise(x0, noise, t), alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise)
    expected = {"epsilon": noise, "sample": x0,
                "v_prediction": alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0}[prediction_type]
    torch.testing.assert_close(sched.target(x0, noise, t), expected)
    steps = sched.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert steps.min() >= 0 and steps.max() < 1000 and steps.unique().numel() > 500


def test_ddpm_rejects_unknown_prediction_type():
    with pytest.raises(UserError, match="epsilon, v_prediction, sample"):
        SCHEDULERS.build({"name": "ddpm", "params": {"prediction_type": "x0"}})


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_samplers_swap_in_via_from_config(name):
    train = SCHEDULERS.build({"name": "ddpm", "params": {"prediction_type": "v_prediction", "beta_schedule": "linear",
                                                         "beta_start": 0.0002, "beta_end": 0.03,
                                                         "num_train_timesteps": 500}})
    sampler = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 7}}, train_scheduler=train)
    cfg = sampler.scheduler.config
    assert (cfg.prediction_type, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end) == ("v_prediction", 500, 0.0002, 0.03)
    torch.testing.assert_close(sampler.scheduler.alphas_cumprod, train.scheduler.alphas_cumprod)
    if name == "dpm_solver":
        assert cfg.algorithm_type == "dpmsolver++"


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_samplers_keep_their_tables_on_the_host_under_any_default_device(name):
    """The benchmarks count FLOPs on models built under `torch.device("meta")`; DPM-Solver's
    constructor copies its sigmas to the host, which failed there."""
    with torch.device("meta"):
        train = SCHEDULERS.build({"name": "ddpm", "params": {}})
        sampler = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 5}}, train_scheduler=train)
    tables = {key: value for key, value in vars(sampler.scheduler).items() if torch.is_tensor(value)}
    assert "alphas_cumprod" in tables and {t.device.type for t in tables.values()} == {"cpu"}
    sampler.scheduler.set_timesteps(5)
    assert sampler.scheduler.timesteps.tolist() == sorted(sampler.scheduler.timesteps.tolist(), reverse=True)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_with_an_oracle_denoiser_recovers_the_clean_sample(name, prediction_type):
    """A denoiser that knows x0 predicts the exact epsilon / v / x0: every sampler must land on x0."""
    train = SCHEDULERS.build({"name": "ddpm", "params": {"prediction_type": prediction_type}})
    sampler = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 10}}, train_scheduler=train)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g).clamp(-2, 2)
    alphas = train.scheduler.alphas_cumprod.double()
    calls = []

    def oracle(x, t):
        calls.append(int(t))
        a = alphas[int(t)]
        eps = (x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
        out = {"epsilon": eps, "sample": x0.double(),
               "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0.double()}[prediction_type]
        return out.float()

    out = sampler.sample(oracle, torch.randn(2, 4, 8, 8, generator=g))
    assert len(calls) == 10 and calls == sorted(calls, reverse=True)
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=0)
    assert len(calls) == 10
    sampler.sample(oracle, torch.randn(2, 4, 8, 8, generator=g), num_inference_steps=4)
    assert len(calls) == 14


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_sampler_steps_its_scheduler_with_host_ints_and_denoises_with_device_timesteps(name, monkeypatch):
    """A device timestep indexing the scheduler's host tables made the host wait for the GPU at
    every step; the loop now hands the scheduler ints, the denoiser tensors, and samples as the
    device-timestep loop did."""
    train = SCHEDULERS.build({"name": "ddpm", "params": {}})
    sampler = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 6}}, train_scheduler=train)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def denoise(x, t):
        assert torch.is_tensor(t) and t.shape == () and t.device == x.device
        return 0.1 * x + 1e-3 * t.float()

    stepped_with = []
    step = type(sampler.scheduler).step
    monkeypatch.setattr(type(sampler.scheduler), "step",
                        lambda self, output, t, *a, **k: stepped_with.append(t) or step(self, output, t, *a, **k))
    out = sampler.sample(denoise, noise, generator=torch.Generator().manual_seed(1))
    assert len(stepped_with) == 6 and all(type(t) is int for t in stepped_with)
    monkeypatch.undo()

    reference = SAMPLERS.build({"name": name, "params": {"num_inference_steps": 6}}, train_scheduler=train).scheduler
    reference.set_timesteps(6, device=noise.device)
    x, g = noise * reference.init_noise_sigma, torch.Generator().manual_seed(1)
    for t in reference.timesteps:  # the device-timestep loop
        x = reference.step(denoise(reference.scale_model_input(x, t), t), t, x, return_dict=False,
                           **sampler.step_kwargs(g))[0]
    assert stepped_with == reference.timesteps.tolist()
    torch.testing.assert_close(out, x, rtol=0, atol=0)


# ------------------------------------------------------------------ SD-1.5-shaped path
@pytest.mark.slow
def test_sd15_shaped_unet_and_vae_build_and_round_trip_through_local_dirs(tmp_path):
    """The paper-scale config (random init): an 860M-parameter inpainting UNet (9 input channels,
    cross-attention 768) and the SD AutoencoderKL; save_pretrained -> the config's `pretrained` /
    `path` params load them back with equal outputs."""
    from id2face.config import load_config

    cfg = load_config([], ["model.first_stage.params.random_init=true"]).model
    vae = FIRST_STAGES.build(cfg.first_stage)
    assert (vae.latent_channels, vae.downscale) == (4, 8)
    assert 83e6 < sum(p.numel() for p in vae.parameters()) < 84e6  # SD's vae: 83.65M
    runtime = dict(in_channels=2 * vae.latent_channels + 1, out_channels=vae.latent_channels,
                   cross_attention_dim=cfg.context_dim)
    torch.manual_seed(0)
    backbone = BACKBONES.build(cfg.backbone, **runtime)
    config = backbone.unet.config
    assert (config.in_channels, config.out_channels, config.cross_attention_dim) == (9, 4, 768)
    assert 859e6 < sum(p.numel() for p in backbone.parameters()) < 860e6  # SD-1.5 UNet: 859.5M

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    sample, context = torch.randn(1, 9, 8, 8, generator=g), torch.randn(1, 20, 768, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        expected_latents, expected_eps = vae.encode(image), backbone(sample, t, context)
    backbone.unet.save_pretrained(tmp_path / "unet")
    vae.vae.save_pretrained(tmp_path / "vae")
    del backbone, vae

    cfg = load_config([], [f"model.first_stage.params.path={tmp_path / 'vae'}",
                           f"model.backbone.params.pretrained={tmp_path / 'unet'}"]).model
    loaded_vae = FIRST_STAGES.build(cfg.first_stage)
    loaded = BACKBONES.build(cfg.backbone, **runtime)
    with torch.no_grad():
        torch.testing.assert_close(loaded_vae.encode(image), expected_latents)
        torch.testing.assert_close(loaded(sample, t, context), expected_eps)


@pytest.mark.parametrize("switch", [{"channels_last": True}, {"sdpa_backends": ["math"]},
                                    {"gradient_checkpointing": True},
                                    {"gradient_checkpointing": True, "sdpa_backends": ["math"]},
                                    pytest.param({"compile": True}, marks=pytest.mark.slow)])
def test_speed_switches_keep_outputs_gradients_and_parameter_names(switch, fresh_dynamo):
    """A speed switch changes how the UNet runs, never what it computes or how its weights are named."""
    results = []
    for params in ({}, switch):
        backbone = unet(params, seed=2).train()
        out = backbone(*unet_inputs())
        out.square().mean().backward()
        results.append((out.detach(), backbone.unet.conv_in.weight.grad.clone(), list(backbone.state_dict())))
    (out0, grad0, names0), (out1, grad1, names1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad1, grad0, rtol=1e-4, atol=1e-6)
    assert names1 == names0
    if switch.get("channels_last"):
        assert backbone.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_unet_in_bf16_runs_whole_in_bf16_and_returns_the_callers_dtype():
    reference, low = unet(), unet({"dtype": "bfloat16"})  # same seed: the same weights, rounded
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    sample, timesteps, context = unet_inputs()
    with torch.no_grad():
        expected, result = reference(sample, timesteps, context), low(sample, timesteps, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = reference(sample, timesteps, context).float()
            # autocast is off inside: an enclosing one changes nothing
            torch.testing.assert_close(low(sample, timesteps, context), result, rtol=0, atol=0)
    assert result.dtype == torch.float32 and not torch.equal(result, expected)
    # as close to fp32 as bf16 autocast gets (norms in bf16 here, in fp32 there)
    assert (result - expected).abs().mean() < 1.5 * (mixed - expected).abs().mean()
    with pytest.raises(UserError, match="backbone unet dtype: 'int8'; valid: null, float32, bfloat16, float16"):
        unet({"dtype": "int8"})


class NormsInFp32(torch.overrides.TorchFunctionMode):
    """CUDA autocast's policy for the two norms (CPU autocast runs them in bf16): fp32 inputs, fp32 out."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.group_norm, torch.nn.functional.layer_norm) \
                and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return func(*[a.float() if torch.is_tensor(a) else a for a in args], **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def test_low_precision_norms_run_in_the_autocast_dtype_and_change_nothing_without_it():
    stock, low = unet(), unet({"low_precision_norms": True})
    assert list(low.state_dict()) == list(stock.state_dict())
    norm_outputs = []
    for module in low.modules():
        if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            module.register_forward_hook(lambda mod, args, out: norm_outputs.append(out.dtype))
    sample, timesteps, context = unet_inputs()
    with torch.no_grad():  # without autocast: the stock computation
        torch.testing.assert_close(low(sample, timesteps, context), stock(sample, timesteps, context), rtol=0, atol=0)
    assert set(norm_outputs) == {torch.float32}

    def run(model, mixed):
        model.zero_grad()
        with NormsInFp32(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            out = model(sample, timesteps, context).float()
        out.square().mean().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    reference, autocast = run(stock, False), run(stock, True)
    norm_outputs.clear()
    ours = run(low, True)  # CUDA's policy does not reach them: they are in bf16
    assert len(norm_outputs) == 33 and set(norm_outputs) == {torch.bfloat16}
    for mine, theirs, exact in zip(ours, autocast, reference):  # outputs, then gradients
        assert not torch.equal(mine, theirs)
        assert (mine - exact).abs().mean() < 1.5 * (theirs - exact).abs().mean()


class SdpaBackendsSeen(torch.overrides.TorchFunctionMode):
    """Which SDPA backends each attention call may use, best first (PyTorch's priority order)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.scaled_dot_product_attention:
            from torch.nn.attention import _cur_sdpa_kernel_backends

            self.calls.append([backend.name for backend in _cur_sdpa_kernel_backends(with_priority=True)])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("order", [["cudnn_attention", "flash_attention"], ["math", "efficient_attention"]])
def test_sdpa_backends_run_attention_in_the_listed_order_and_restore_pytorchs(order):
    """A CPU picks its kernel whatever the order (flash, else math), so what is checked is what a
    GPU's SDPA is told: only these backends, the list's first preferred (cuDNN comes after math in
    PyTorch's own order, so a list is the only way to it)."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    before = _cur_sdpa_kernel_backends(with_priority=True)
    seen = SdpaBackendsSeen()
    with seen, torch.no_grad():
        unet({"sdpa_backends": order})(*unet_inputs())
    assert len(seen.calls) == 8  # TINY_UNET: 4 transformer blocks (down 1, mid 1, up 2) x self + cross
    assert all(call == [name.upper() for name in order] for call in seen.calls)
    assert _cur_sdpa_kernel_backends(with_priority=True) == before


def test_unknown_sdpa_backend_names_the_valid_ones():
    with pytest.raises(UserError, match="flash_attention"):
        unet({"sdpa_backends": ["flash"]})


@pytest.mark.parametrize("switch", [{"channels_last": True},
                                    pytest.param({"channels_last": True, "compile": True}, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", AUTOENCODERS)
def test_autoencoder_speed_switches_keep_latents_images_and_parameter_names(name, switch, fresh_dynamo):
    results = []
    for params in ({}, switch):
        torch.manual_seed(3)
        stage = FIRST_STAGES.build({"name": name, "params": {**FIRST_STAGE_PARAMS[name], **params}})
        with torch.no_grad():
            latents = stage.encode(images(seed=4))
            decoded = stage.decode(latents)
        assert latents.is_contiguous() and decoded.is_contiguous()  # callers get plain NCHW tensors
        results.append((latents, decoded, list(stage.state_dict())))
    (lat0, dec0, names0), (lat1, dec1, names1) = results
    torch.testing.assert_close(lat1, lat0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dec1, dec0, rtol=1e-4, atol=1e-5)
    assert names1 == names0
    first_conv = next(m for m in stage.vae.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_autoencoder_in_bf16_runs_whole_in_bf16_and_returns_the_callers_dtype(name):
    torch.manual_seed(3)
    reference = FIRST_STAGES.build({"name": name, "params": FIRST_STAGE_PARAMS[name]})
    torch.manual_seed(3)
    stage = FIRST_STAGES.build({"name": name, "params": {**FIRST_STAGE_PARAMS[name], "dtype": "bfloat16"}})
    assert {p.dtype for p in stage.parameters()} == {torch.bfloat16}
    x = images(seed=4)
    with torch.no_grad():
        latents, expected_latents = stage.encode(x), reference.encode(x)
        decoded, expected = stage.decode(expected_latents), reference.decode(expected_latents)
        # autocast is off inside: an enclosing one changes nothing (norms stay bf16, no fp32 casts)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(stage.decode(expected_latents), decoded, rtol=0, atol=0)
    assert latents.dtype == decoded.dtype == torch.float32
    scale = expected.abs().max()
    assert (decoded - expected).abs().max() < 0.05 * scale  # bf16: ~3 significant digits per layer
    assert (latents - expected_latents).abs().max() < 0.05 * expected_latents.abs().max()
    assert not torch.equal(decoded, expected)  # it did run in bf16


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_autoencoder_dtype_must_be_a_float_dtype(name):
    with pytest.raises(UserError, match=f"first_stage {name} dtype: 'int8'; valid: null, float32, bfloat16, float16"):
        FIRST_STAGES.build({"name": name, "params": {**FIRST_STAGE_PARAMS[name], "dtype": "int8"}})


def test_a_first_stage_rebuilt_on_the_defaults_decodes_on_the_scale_it_trained_with():
    """A checkpoint moved to a machine without its VAE folder is rebuilt on SD-1.5's config; its
    latents' scale (SDXL VAE: 0.13025) is config, not weights, and comes from the state dict."""
    trained = FIRST_STAGES.build({"name": "sd_vae", "params": {"random_init": True,
                                                              "config": {**TINY_VAE, "scaling_factor": 0.13025}}})
    state = trained.state_dict()
    rebuilt = FIRST_STAGES.build({"name": "sd_vae", "params": {"random_init": True, "config": TINY_VAE}})
    assert rebuilt.scaling_factor == pytest.approx(0.18215)
    rebuilt.load_state_dict(state)
    assert rebuilt.scaling_factor == pytest.approx(0.13025)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.equal(rebuilt.encode(images), trained.encode(images))
    old = {k: v for k, v in state.items() if k != "latent_scale"}  # a checkpoint from before it was kept
    default = FIRST_STAGES.build({"name": "sd_vae", "params": {"random_init": True, "config": TINY_VAE}})
    default.load_state_dict(old)
    assert default.scaling_factor == pytest.approx(0.18215)
