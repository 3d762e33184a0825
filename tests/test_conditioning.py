"""Conditioning components against the model contract: identity latent models, attribute encoders,
alignments, identity mappings, guidance, and the tiny identity encoder.

Interface tests are parametrised over each registry's names, so a new variant is tested as soon
as it is registered; behaviour tests pin each variant's defining numbers.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from id2face.components.alignment import debiased_linear_cka, stopgrad_alignment
from id2face.components.id_mapping import KeyedIdentityMapping, orthogonalize
from id2face.components.id_vae import IdLatent, gaussian_kl
from id2face.errors import MissingWeightsError, UserError
from id2face.registry import (ALIGNMENTS, ATTRIBUTE_ENCODERS, GUIDANCES, ID_MAPPINGS, ID_VAES,
                              IDENTITY_ENCODERS)

N, D, C, S = 6, 32, 24, 32
NULL_VARIANT = {ID_VAES: "none", ATTRIBUTE_ENCODERS: "none", ALIGNMENTS: "none", ID_MAPPINGS: "random",
                GUIDANCES: "none"}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=gen(seed)), dim=-1)


def images_and_masks(n: int = N, size: int = S, seed: int = 0):
    images = torch.rand(n, 3, size, size, generator=gen(seed)) * 2 - 1
    masks = torch.zeros(n, 1, size, size)
    masks[:, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1  # the inner-face box
    return images, masks


def build_tiny(**params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return IDENTITY_ENCODERS.build({"name": "tiny", "params": params})


@pytest.mark.parametrize("registry", list(NULL_VARIANT), ids=lambda r: r.role)
def test_null_variant_is_registered_first(registry):
    registry.names()  # loads the module
    assert next(iter(registry._entries)) == NULL_VARIANT[registry]


# --------------------------------------------------------------------------- identity latent


@pytest.mark.parametrize("name", ID_VAES.names())
def test_id_vae_contract(name):
    torch.manual_seed(0)
    vae = ID_VAES.build(name, in_dim=D)
    assert isinstance(vae, nn.Module)
    e = unit(N, D, 1)
    for training in (True, False):
        lat = vae.train(training)(e)
        L = vae.latent_dim
        assert isinstance(lat, IdLatent)
        assert lat.z.shape == lat.mu.shape == (N, L)
        assert lat.logvar is None or lat.logvar.shape == (N, L)
        assert lat.e_hat.shape == (N, D)
        torch.testing.assert_close(lat.e_hat.norm(dim=-1), torch.ones(N))
        assert lat.loss.shape == () and torch.isfinite(lat.loss)
        assert all(v.shape == () and not v.requires_grad for v in lat.logs.values())
    vae.eval()
    torch.testing.assert_close(vae.encode(e), vae(e).mu)
    torch.testing.assert_close(vae.decode(vae(e).z), vae(e).e_hat)
    prior = vae.sample_prior(5, generator=gen(3))
    assert prior.shape == (5, vae.latent_dim) and prior.dtype == torch.float32
    torch.testing.assert_close(prior, vae.sample_prior(5, generator=gen(3)))  # reproducible from the generator
    assert not torch.allclose(prior, vae.sample_prior(5, generator=gen(4)))
    if any(p.requires_grad for p in vae.parameters()):  # trainable variants learn from their loss
        vae.train()(e).loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    # The training step runs both sides of a pair in one pass and splits it: the same per-sample
    # latents as one pass per side, and the mean of their losses.
    vae.eval()
    other = unit(N, D, 2)
    halves = vae(torch.cat([e, other])).chunk(2)
    for half, alone in zip(halves, (vae(e), vae(other))):
        for field in ("z", "mu", "logvar", "e_hat"):
            got, expected = getattr(half, field), getattr(alone, field)
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected)
    torch.testing.assert_close(halves[0].loss, 0.5 * (vae(e).loss + vae(other).loss))


def test_none_id_vae_passes_the_embedding_through():
    vae = ID_VAES.build("none", in_dim=D)
    e = unit(N, D, 0)
    lat = vae(e)
    assert vae.latent_dim == D and lat.logvar is None
    assert torch.equal(lat.z, e) and torch.equal(lat.mu, e)
    assert lat.loss.item() == 0.0
    torch.testing.assert_close(vae.sample_prior(100, generator=gen(0)).norm(dim=-1), torch.ones(100))


def test_gaussian_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zeros = torch.zeros(4, 16)
    assert gaussian_kl(zeros, zeros).item() == pytest.approx(0.0, abs=1e-7)
    # closed form for mu = 1, logvar = 0: 0.5 * mu^2 per dim
    assert gaussian_kl(torch.ones(4, 16), zeros).item() == pytest.approx(8.0, rel=1e-6)
    assert gaussian_kl(zeros, torch.full((4, 16), -2.0)).item() == pytest.approx(8 * (math.exp(-2) + 1), rel=1e-6)


def test_vae_samples_in_training_and_returns_mu_in_eval():
    torch.manual_seed(0)
    vae = ID_VAES.build({"name": "vae", "params": {"latent_dim": 8, "hidden_dim": 32, "beta": 0.5}}, in_dim=D)
    e = unit(N, D, 1)
    lat = vae.eval()(e)
    assert torch.equal(lat.z, lat.mu)
    lat_train = vae.train()(e)
    torch.testing.assert_close(lat_train.mu, lat.mu)
    std = (0.5 * lat_train.logvar).exp()
    deviation = (lat_train.z - lat_train.mu) / std  # the reparameterisation noise
    assert deviation.abs().min() > 0 and 0.5 < deviation.std() < 1.5
    # loss = cosine reconstruction + beta * KL, recomputed from the returned tensors
    recon = (1 - F.cosine_similarity(lat_train.e_hat, e, dim=-1)).mean()
    kl = gaussian_kl(lat_train.mu, lat_train.logvar)
    torch.testing.assert_close(lat_train.loss, recon + 0.5 * kl)


def test_deterministic_prior_matches_the_latent_norm_seen_in_training():
    torch.manual_seed(0)
    vae = ID_VAES.build({"name": "deterministic", "params": {"latent_dim": 8, "hidden_dim": 32}}, in_dim=D)
    e = unit(64, D, 2)
    lat = vae.train()(e)
    assert lat.logvar is None and torch.equal(lat.z, lat.mu)
    target = lat.mu.norm(dim=-1).mean()
    torch.testing.assert_close(vae.latent_norm, target.detach())  # first batch sets it exactly
    vae.eval()(e * 3)  # eval batches do not move it
    torch.testing.assert_close(vae.latent_norm, target.detach())
    draws = vae.sample_prior(10, generator=gen(0))
    torch.testing.assert_close(draws.norm(dim=-1), target.detach().expand(10))
    assert "latent_norm" in vae.state_dict()


# --------------------------------------------------------------------------- attribute encoders


@pytest.mark.parametrize("name", ATTRIBUTE_ENCODERS.names())
def test_attribute_encoder_contract(name):
    torch.manual_seed(0)
    encoder = ATTRIBUTE_ENCODERS.build({"name": name, "params": {}}, context_dim=C)
    images, masks = images_and_masks()
    tokens = encoder(images, masks)
    assert tokens.shape == (N, encoder.num_tokens, C) and torch.isfinite(tokens).all()
    tokens64 = encoder(*images_and_masks(size=64))  # any image size
    assert tokens64.shape == (N, encoder.num_tokens, C)
    if any(p.requires_grad for p in encoder.parameters()):
        tokens.square().mean().backward()
        assert all(p.grad is not None for p in encoder.parameters())


def test_none_attribute_encoder_gives_one_zero_token():
    encoder = ATTRIBUTE_ENCODERS.build("none", context_dim=C)
    images, masks = images_and_masks()
    assert encoder.num_tokens == 1 and torch.equal(encoder(images, masks), torch.zeros(N, 1, C))


@pytest.mark.parametrize("input_size", [None, 16], ids=["full-size", "downsampled"])
@pytest.mark.parametrize("name, invariant", [("masked", True), ("unmasked", False)])
def test_only_masked_encoder_is_blind_inside_the_identity_mask(name, invariant, input_size):
    torch.manual_seed(0)
    encoder = ATTRIBUTE_ENCODERS.build({"name": name, "params": {"num_tokens": 4, "width": 32, "input_size": input_size}},
                                       context_dim=C)
    images, masks = images_and_masks()
    changed_inside = torch.where(masks.bool(), torch.rand(images.shape, generator=gen(5)) * 2 - 1, images)
    changed_outside = torch.where(masks.bool(), images, torch.rand(images.shape, generator=gen(6)) * 2 - 1)
    with torch.no_grad():
        base = encoder(images, masks)
        inside = (encoder(changed_inside, masks) - base).abs().max().item()
        outside = (encoder(changed_outside, masks) - base).abs().max().item()
    assert outside > 1e-3  # both see the rest of the image
    if invariant:
        assert inside == 0.0
    else:
        assert inside > 1e-3


@pytest.mark.parametrize("name", ["masked", "unmasked"])
def test_attribute_input_size_cuts_the_trunk_cost_of_large_images(name):
    from torch.utils.flop_counter import FlopCounterMode

    images, masks = images_and_masks(size=64)
    flops = {}
    for input_size in (None, 32, 64):
        torch.manual_seed(0)
        encoder = ATTRIBUTE_ENCODERS.build({"name": name, "params": {"input_size": input_size}}, context_dim=C)
        counter = FlopCounterMode(display=False)
        with counter:
            tokens = encoder(images, masks)
        assert tokens.shape == (N, encoder.num_tokens, C)
        flops[input_size] = counter.get_total_flops()
    assert flops[64] == flops[None]  # not larger than input_size: untouched
    assert flops[32] < 0.45 * flops[None]  # half the side: a quarter of the trunk (the token head stays)


@pytest.mark.parametrize("name", ["masked", "unmasked"])
def test_attribute_encoder_low_precision_norms(name):
    """Its GroupNorms and LayerNorm in the autocast dtype: the stock encoder without autocast, bf16
    norm outputs under it; the parameters are the same tensors by the same names."""
    from id2face.components.norms import AutocastDtypeGroupNorm, AutocastDtypeLayerNorm

    encoders = []
    for low in (False, True):
        torch.manual_seed(0)
        encoders.append(ATTRIBUTE_ENCODERS.build({"name": name, "params": {"low_precision_norms": low}},
                                                 context_dim=C))
    stock, low = encoders
    assert list(low.state_dict()) == list(stock.state_dict())
    norms = [m for m in low.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert len(norms) == 5 and all(isinstance(m, (AutocastDtypeGroupNorm, AutocastDtypeLayerNorm)) for m in norms)
    outputs = []
    for m in norms:
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.dtype))
    images, masks = images_and_masks()
    with torch.no_grad():
        torch.testing.assert_close(low(images, masks), stock(images, masks), rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low(images, masks)
    assert outputs == [torch.float32] * 5 + [torch.bfloat16] * 5


def test_low_precision_norms_switch_exact_norm_types_only():
    from id2face.components.norms import use_low_precision_norms

    class OwnNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    module = nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4), OwnNorm(4), nn.BatchNorm1d(4))
    assert use_low_precision_norms(module) == 2
    assert type(module[2]) is OwnNorm and type(module[3]) is nn.BatchNorm1d


# --------------------------------------------------------------------------- alignment


def latent(mu: torch.Tensor, z: torch.Tensor | None = None) -> IdLatent:
    return IdLatent(z=mu if z is None else z, mu=mu, logvar=None, e_hat=F.normalize(mu, dim=-1),
                    loss=mu.new_zeros(()))


def alignment_inputs(seed: int = 0, L: int = 8):
    g = gen(seed)
    mu_a, mu_b = torch.randn(N, L, generator=g), torch.randn(N, L, generator=g)
    z_a, z_b = mu_a + 0.1 * torch.randn(N, L, generator=g), mu_b + 0.1 * torch.randn(N, L, generator=g)
    e_a, e_b = unit(N, D, seed + 1), unit(N, D, seed + 2)
    attr_a, attr_b = torch.randn(N, 3, C, generator=g), torch.randn(N, 3, C, generator=g)
    return latent(mu_a, z_a), latent(mu_b, z_b), e_a, e_b, attr_a, attr_b


@pytest.mark.parametrize("name", ALIGNMENTS.names())
def test_alignment_contract(name):
    alignment = ALIGNMENTS.build(name)
    lat_a, lat_b, e_a, e_b, attr_a, attr_b = alignment_inputs()
    out = alignment(lat_a, lat_b, e_a, e_b, attr_a, attr_b)
    assert out.id_for_a.shape == out.id_for_b.shape == lat_a.z.shape
    assert out.loss.shape == () and torch.isfinite(out.loss)
    for value in (out.id_for_a, out.id_for_b):  # conditions are the latents' z, not mu
        assert any(value is lat.z for lat in (lat_a, lat_b))
    assert all(v.shape == () and not v.requires_grad for v in out.logs.values())


def test_none_alignment_keeps_own_identity_and_has_no_loss():
    lat_a, lat_b, *rest = alignment_inputs()
    out = ALIGNMENTS.build("none")(lat_a, lat_b, *rest)
    assert out.id_for_a is lat_a.z and out.id_for_b is lat_b.z and out.loss.item() == 0.0


def test_bidirectional_swaps_identities_and_aligns_both_sides():
    lat_a, lat_b, *rest = alignment_inputs()
    out = ALIGNMENTS.build({"name": "bidirectional", "params": {"decorrelation_weight": 0.0}})(lat_a, lat_b, *rest)
    assert out.id_for_a is lat_b.z and out.id_for_b is lat_a.z
    torch.testing.assert_close(out.loss, F.mse_loss(lat_a.mu, lat_b.mu))


def test_unidirectional_conditions_both_on_b():
    lat_a, lat_b, *rest = alignment_inputs()
    out = ALIGNMENTS.build({"name": "unidirectional", "params": {"decorrelation_weight": 0.0}})(lat_a, lat_b, *rest)
    assert out.id_for_a is lat_b.z and out.id_for_b is lat_b.z
    torch.testing.assert_close(out.loss, F.mse_loss(lat_a.mu, lat_b.mu))


def test_stopgrad_alignment_moves_only_the_online_side():
    online = torch.randn(N, 8, generator=gen(0), requires_grad=True)
    target = torch.randn(N, 8, generator=gen(1), requires_grad=True)
    stopgrad_alignment(online, target).backward()
    assert target.grad is None
    torch.testing.assert_close(online.grad, 2 * (online - target).detach() / online.numel())


@pytest.mark.parametrize("name, a_moves, b_moves", [("bidirectional", True, True), ("unidirectional", True, False)])
def test_alignment_gradients_respect_the_stop_gradient(name, a_moves, b_moves):
    lat_a, lat_b, e_a, e_b, attr_a, attr_b = alignment_inputs()
    mu_a = lat_a.mu.clone().requires_grad_(True)
    mu_b = lat_b.mu.clone().requires_grad_(True)
    out = ALIGNMENTS.build({"name": name, "params": {"decorrelation_weight": 0.0}})(
        latent(mu_a), latent(mu_b), e_a, e_b, attr_a, attr_b)
    grad_a, grad_b = torch.autograd.grad(out.loss, [mu_a, mu_b], allow_unused=True)
    difference = (mu_a - mu_b).detach()
    if name == "bidirectional":  # each side pulled towards the other's (fixed) position, half weight each
        torch.testing.assert_close(grad_a, difference / difference.numel())
        torch.testing.assert_close(grad_b, -difference / difference.numel())
    else:  # only A moves to B; B receives nothing from the alignment
        torch.testing.assert_close(grad_a, 2 * difference / difference.numel())
        assert grad_b is None or grad_b.abs().max() == 0
    assert (grad_a is not None and grad_a.abs().max() > 0) == a_moves


def test_decorrelation_is_near_zero_when_independent_and_large_when_correlated():
    g = gen(0)
    e = F.normalize(torch.randn(4096, D, generator=g), dim=-1)
    independent = torch.randn(4096, C, generator=g)
    mixing = torch.randn(D, C, generator=g)
    assert abs(debiased_linear_cka(independent, e).item()) < 0.01
    assert debiased_linear_cka(e @ mixing, e).item() > 0.5
    assert debiased_linear_cka(e, e).item() == pytest.approx(1.0, abs=1e-5)
    # unbiased at training batch sizes: independent batches of 12 average ~0, correlated stay large
    small_independent = torch.stack([debiased_linear_cka(torch.randn(12, C, generator=g), torch.randn(12, D, generator=g))
                                     for _ in range(200)])
    small_correlated = torch.stack([debiased_linear_cka(x @ mixing, x) for x in torch.randn(200, 12, D, generator=g)])
    assert abs(small_independent.mean().item()) < 0.03 and small_correlated.mean().item() > 0.5
    # through the alignment: attribute tokens that encode identity are penalised, and the
    # gradient reaches the tokens only
    lat_a, lat_b, e_a, e_b, _, _ = alignment_inputs()
    mixing = torch.randn(D, C, generator=g)
    leaky_a = (e_a @ mixing).unsqueeze(1).repeat(1, 3, 1).requires_grad_(True)
    leaky_b = (e_b @ mixing).unsqueeze(1).repeat(1, 3, 1).requires_grad_(True)
    clean_a, clean_b = torch.randn(N, 3, C, generator=g), torch.randn(N, 3, C, generator=g)
    alignment = ALIGNMENTS.build({"name": "bidirectional", "params": {"align_weight": 0.0}})
    leaky = alignment(lat_a, lat_b, e_a, e_b, leaky_a, leaky_b)
    clean = alignment(lat_a, lat_b, e_a, e_b, clean_a, clean_b)
    assert leaky.logs["decorrelation"] > clean.logs["decorrelation"] + 0.2
    leaky.loss.backward()
    assert leaky_a.grad.abs().max() > 0
    zero = ALIGNMENTS.build("bidirectional")(lat_a, lat_b, e_a, e_b, torch.zeros(N, 3, C), torch.zeros(N, 3, C))
    assert torch.isfinite(zero.loss) and zero.logs["decorrelation"] == 0  # constant tokens: nothing to penalise


def test_losses_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    vae = ID_VAES.build({"name": "vae", "params": {"latent_dim": 8, "hidden_dim": 32}}, in_dim=D)
    alignment = ALIGNMENTS.build("bidirectional")
    e_a, e_b = unit(16, D, 0), unit(16, D, 1)
    attr_a, attr_b = torch.randn(16, 3, C, generator=gen(2)), torch.randn(16, 3, C, generator=gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lat_a, lat_b = vae(e_a), vae(e_b)
        out = alignment(lat_a, lat_b, e_a, e_b, attr_a, attr_b)
    reference = alignment(vae(e_a), vae(e_b), e_a, e_b, attr_a, attr_b)
    assert lat_a.loss.dtype == out.loss.dtype == torch.float32
    # the decorrelation on identical fp32 inputs is computed in fp32 inside autocast too
    torch.testing.assert_close(out.logs["decorrelation"], reference.logs["decorrelation"])


# --------------------------------------------------------------------------- identity mappings


def gaussian_prior(L: int):
    def prior(n, generator=None):
        return torch.randn(n, L, generator=generator)
    return prior


@pytest.mark.parametrize("name", ID_MAPPINGS.names())
def test_id_mapping_contract(name):
    mapping = ID_MAPPINGS.build(name)
    L = 16
    source = torch.randn(N, L, generator=gen(0))
    out = mapping(source, gaussian_prior(L), generator=gen(1), key="secret", gallery=torch.randn(3, L, generator=gen(2)))
    assert out.shape == (N, L) and out.dtype == source.dtype and torch.isfinite(out).all()
    again = mapping(source, gaussian_prior(L), generator=gen(1), key="secret", gallery=torch.randn(3, L, generator=gen(2)))
    assert torch.equal(out, again)  # reproducible from generator / key


def test_random_mapping_is_the_prior_draw():
    L = 16
    out = ID_MAPPINGS.build("random")(torch.randn(N, L), gaussian_prior(L), generator=gen(7))
    assert torch.equal(out, torch.randn(N, L, generator=gen(7)))


@pytest.mark.parametrize("L, gallery_size", [(16, 0), (16, 5), (64, 20), (8, 6)])
def test_orthogonal_mapping_removes_source_and_gallery_and_keeps_the_norm(L, gallery_size):
    source = torch.randn(32, L, generator=gen(0))
    gallery = torch.randn(gallery_size, L, generator=gen(1)) if gallery_size else None
    out = ID_MAPPINGS.build("orthogonal")(source, gaussian_prior(L), generator=gen(2), gallery=gallery)
    z = torch.randn(32, L, generator=gen(2))  # the prior draw it started from
    assert F.cosine_similarity(out, source, dim=-1).abs().max() < 1e-5
    if gallery is not None:
        assert F.cosine_similarity(out[:, None], gallery[None], dim=-1).abs().max() < 1e-5
    torch.testing.assert_close(out.norm(dim=-1), z.norm(dim=-1), rtol=1e-6, atol=0)
    # only what had to go went: what remains of z is kept up to the rescaling
    assert F.cosine_similarity(out, z, dim=-1).min() > 0


def test_orthogonalize_refuses_a_gallery_that_spans_the_latent():
    with pytest.raises(UserError, match="avoid at most 6 identities"):
        orthogonalize(torch.randn(2, 8), torch.randn(2, 8), torch.randn(7, 8))


def noisy_copy(mu: torch.Tensor, angle: float, seed: int) -> torch.Tensor:
    """``mu`` turned by exactly ``angle`` radians in a random direction (a second photo)."""
    noise = torch.randn(mu.shape, generator=gen(seed))
    noise = noise - (noise * mu).sum(-1, keepdim=True) / mu.pow(2).sum(-1, keepdim=True) * mu
    return mu.norm(dim=-1, keepdim=True) * (math.cos(angle) * F.normalize(mu, dim=-1) + math.sin(angle) * F.normalize(noise, dim=-1))


def test_keyed_mapping_is_stable_per_person_and_unrelated_across_people_and_keys():
    L, people, angle = 64, 400, 0.02
    mapping = KeyedIdentityMapping(num_bits=12)
    prior = gaussian_prior(L)
    mu = torch.randn(people, L, generator=gen(0))
    photo_1, photo_2 = noisy_copy(mu, angle, 1), noisy_copy(mu, angle, 2)
    out_1 = mapping(photo_1, prior, key="alpha")
    out_2 = mapping(photo_2, prior, key="alpha", generator=gen(99))  # generator is ignored
    same_cell = (mapping.cells(photo_1, "alpha") == mapping.cells(photo_2, "alpha")).all(-1)
    expected = (1 - 2 * angle / math.pi) ** 12  # both photos are `angle` from mu: up to 2*angle apart
    assert same_cell.float().mean() > expected - 0.05
    cos_same = F.cosine_similarity(out_1, out_2, dim=-1)
    assert cos_same[same_cell].min() > 0.99  # one consistent pseudo-identity (up to re-orthogonalisation)
    assert F.cosine_similarity(out_1, photo_1, dim=-1).abs().max() < 1e-5
    torch.testing.assert_close(mapping(photo_1, prior, key="alpha"), out_1, rtol=0, atol=0)

    def mean_abs_cos(x, y):
        return F.cosine_similarity(x, y, dim=-1).abs().mean().item()

    chance = mean_abs_cos(torch.randn(4000, L, generator=gen(5)), torch.randn(4000, L, generator=gen(6)))
    other_person = out_1.roll(1, dims=0)
    other_key = mapping(photo_1, prior, key="beta")
    assert abs(mean_abs_cos(out_1, other_person) - chance) < 0.03
    assert abs(mean_abs_cos(out_1, other_key) - chance) < 0.03
    assert (mapping.cells(mu, "alpha") != mapping.cells(mu, "beta")).float().mean() > 0.4  # other hyperplanes


def test_keyed_mapping_requires_a_key():
    with pytest.raises(UserError, match="secret key"):
        KeyedIdentityMapping()(torch.randn(2, 8), gaussian_prior(8))


# --------------------------------------------------------------------------- guidance


@pytest.mark.parametrize("name", GUIDANCES.names())
def test_guidance_contract(name):
    guidance = GUIDANCES.build(name)
    eps = [torch.randn(2, 3, 4, 4, generator=gen(i)) for i in range(3)]
    out = guidance.combine(eps[0], eps_source=eps[1], eps_uncond=eps[2])
    assert out.shape == eps[0].shape and isinstance(guidance.needs_source_condition, bool)
    if not guidance.needs_source_condition and not getattr(guidance, "needs_unconditional", False):
        assert torch.equal(guidance.combine(eps[0]), out)  # works without the extra predictions


def test_guidance_formulas_on_known_tensors():
    cond, source, uncond = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.0, 4.0])
    assert torch.equal(GUIDANCES.build("none").combine(cond, source, uncond), cond)
    negative = GUIDANCES.build({"name": "negative", "params": {"scale": 2.0}})
    assert negative.needs_source_condition
    assert torch.equal(negative.combine(cond, eps_source=source), torch.tensor([2.0, -8.0]))
    cfg = GUIDANCES.build({"name": "cfg", "params": {"scale": 3.0}})
    assert torch.equal(cfg.combine(cond, eps_uncond=uncond), torch.tensor([3.0, -14.0]))
    with pytest.raises(ValueError, match="eps_source"):
        negative.combine(cond)


# --------------------------------------------------------------------------- tiny identity encoder


def test_tiny_encoder_contract_and_gradient_to_the_input():
    with pytest.warns(UserWarning, match="untrained"):
        encoder = IDENTITY_ENCODERS.build("tiny")
    images = (torch.rand(4, 3, 48, 48, generator=gen(0)) * 2 - 1).requires_grad_(True)
    embeddings = encoder(images)
    assert embeddings.shape == (4, 64) and encoder.embed_dim == 64
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    assert not any(p.requires_grad for p in encoder.parameters())
    embeddings[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    encoder.train()
    assert not encoder.training  # frozen: stays in eval mode


def test_tiny_encoder_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = build_tiny(embed_dim=16, width=8)
    assert torch.equal(torch.rand(1), before)
    second = build_tiny(embed_dim=16, width=8)
    images = torch.rand(3, 3, 32, 32, generator=gen(1)) * 2 - 1
    assert torch.equal(first(images), second(images))


def test_tiny_encoder_loads_its_weights_and_rejects_missing_or_mismatched_files(tmp_path):
    source = build_tiny(embed_dim=16, width=8)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen(p.numel())))
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.state_dict(), "encoder": {"name": "tiny", "params": {}}}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained encoder does not warn
        loaded = IDENTITY_ENCODERS.build({"name": "tiny", "params": {"embed_dim": 16, "width": 8, "weights": str(path)}})
    images = torch.rand(3, 3, 32, 32, generator=gen(1)) * 2 - 1
    assert torch.equal(loaded(images), source(images))
    assert not torch.allclose(build_tiny(embed_dim=16, width=8)(images), source(images))
    with pytest.raises(MissingWeightsError, match="train-encoder"):
        IDENTITY_ENCODERS.build({"name": "tiny", "params": {"weights": str(tmp_path / "absent.pt")}})
    with pytest.raises(UserError, match="width=16"):
        IDENTITY_ENCODERS.build({"name": "tiny", "params": {"embed_dim": 16, "weights": str(path)}})
