"""Real identity encoders (facenet, arcface, timm): loading released file layouts, the encoder
contract, and clear errors for missing or mismatched weights.

Weights are random but structurally identical to the released files and saved the same way
(``torch.save`` of a state dict; safetensors for timm), then loaded through a config file.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from id2face.config import load_config
from id2face.errors import MissingWeightsError, UserError
from id2face.registry import IDENTITY_ENCODERS

# Same computation up to float32 rounding; tight enough that a 0.4% input-scale error (facenet's
# std 128/255 vs 0.5) fails.
SAME = {"rtol": 1e-5, "atol": 1e-6}
ARCFACE_TORCH_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}


def randomize_norms_(module: nn.Module, seed: int) -> nn.Module:
    """Give every norm layer non-default affine parameters and running statistics, so a file that
    failed to load (or loaded into the wrong slot) cannot reproduce the source's outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                c = sub.num_features
                sub.weight.copy_(0.5 + torch.rand(c, generator=generator))
                sub.bias.copy_(0.1 * torch.randn(c, generator=generator))
                sub.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                sub.running_var.copy_(0.5 + torch.rand(c, generator=generator))
            elif isinstance(sub, nn.PReLU):
                sub.weight.copy_(0.5 * torch.rand(sub.weight.shape, generator=generator))
    return module.eval()


def config_file(tmp_path, name: str, params: dict):
    """An experiment layer selecting the encoder, as a user would write it."""
    lines = [f"      {key}: {value}" for key, value in params.items()]
    path = tmp_path / "experiment.yaml"
    path.write_text("model:\n  identity_encoder:\n    name: " + name + "\n    params:\n" + "\n".join(lines) + "\n")
    return str(path)


def build_from_config(tmp_path, name: str, params: dict):
    cfg = load_config([config_file(tmp_path, name, params)])
    return IDENTITY_ENCODERS.build(cfg.model.identity_encoder)


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def resized01(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    return (x + 1) / 2


def assert_same_tensors(state: dict, module: nn.Module) -> None:
    loaded = module.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------- facenet


@pytest.fixture(scope="module")
def facenet_release(tmp_path_factory):
    """A random InceptionResnetV1 saved like facenet-pytorch's vggface2 release (logits 8631)."""
    from facenet_pytorch import InceptionResnetV1

    torch.manual_seed(1)
    source = InceptionResnetV1(pretrained=None, classify=False)
    source.logits = nn.Linear(512, 8631)
    randomize_norms_(source, seed=1)
    path = tmp_path_factory.mktemp("facenet") / "20180402-114759-vggface2.pt"
    torch.save(source.state_dict(), path)
    return source, path


@pytest.mark.parametrize("size", [160, 32, 256])
def test_facenet_loads_release_file_and_matches_facenet_pytorch(facenet_release, tmp_path, size):
    from facenet_pytorch import fixed_image_standardization

    source, path = facenet_release
    encoder = build_from_config(tmp_path, "facenet", {"weights": path, "pretrained_on": "vggface2"})
    assert_same_tensors(torch.load(path, weights_only=True), encoder.net)
    x = images(2, size)
    with torch.no_grad():
        expected = source(fixed_image_standardization(resized01(x, 160) * 255))
        got = encoder(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, **SAME)


def test_facenet_names_the_right_pretrained_on_for_a_casia_sized_classifier(facenet_release, tmp_path):
    source, _ = facenet_release
    state = dict(source.state_dict())
    state["logits.weight"], state["logits.bias"] = torch.zeros(10575, 512), torch.zeros(10575)
    path = tmp_path / "20180408-102900-casia-webface.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="pretrained_on: casia-webface") as err:
        IDENTITY_ENCODERS.build({"name": "facenet", "params": {"weights": str(path)}})
    assert "shape mismatches" in str(err.value) and "\n" not in str(err.value)
    encoder = IDENTITY_ENCODERS.build({"name": "facenet", "params": {"weights": str(path),
                                                                     "pretrained_on": "casia-webface"}})
    assert encoder.net.logits.out_features == 10575


def test_facenet_loads_a_file_without_classifier_or_batch_counters(facenet_release, tmp_path):
    # Files written by older torch (or re-saved without the classifier) lack these keys.
    source, _ = facenet_release
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith("logits.") and not k.endswith("num_batches_tracked")}
    path = tmp_path / "facenet_no_logits.pt"
    torch.save({"state_dict": state}, path)
    encoder = IDENTITY_ENCODERS.build({"name": "facenet", "params": {"weights": str(path), "pretrained_on": None}})
    x = images(2, 160)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), source((x + 1) / 2 * 255 / 128 - 127.5 / 128), **SAME)


# ---------------------------------------------------------------- arcface


def arcface_torch_layout(blocks: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of arcface_torch ``backbones/iresnet.py`` (num_features 512),
    written out from its definition, independently of id2face's implementation."""

    def bn(prefix: str, c: int) -> dict:
        shapes = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
        return {**shapes, f"{prefix}.num_batches_tracked": ()}

    layout = {"conv1.weight": (64, 3, 3, 3), **bn("bn1", 64), "prelu.weight": (64,)}
    inplanes = 64
    for stage, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for index in range(count):
            p, cin = f"layer{stage}.{index}.", inplanes if index == 0 else planes
            layout.update(bn(p + "bn1", cin))
            layout[p + "conv1.weight"] = (planes, cin, 3, 3)
            layout.update(bn(p + "bn2", planes))
            layout[p + "prelu.weight"] = (planes,)
            layout[p + "conv2.weight"] = (planes, planes, 3, 3)
            layout.update(bn(p + "bn3", planes))
            if index == 0:  # every stage starts with a stride-2 block
                layout[p + "downsample.0.weight"] = (planes, cin, 1, 1)
                layout.update(bn(p + "downsample.1", planes))
        inplanes = planes
    layout.update(bn("bn2", 512))
    layout.update({"fc.weight": (512, 512 * 7 * 7), "fc.bias": (512,)})
    layout.update(bn("features", 512))
    return layout


def arcface_torch_forward(state: dict, x: torch.Tensor, blocks: tuple[int, ...]) -> torch.Tensor:
    """arcface_torch ``IResNet.forward`` (eval mode) written functionally on a state dict."""

    def bn(prefix, h):
        return F.batch_norm(h, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                            state[prefix + ".weight"], state[prefix + ".bias"], False, 0.0, 1e-5)

    h = F.prelu(bn("bn1", F.conv2d(x, state["conv1.weight"], padding=1)), state["prelu.weight"])
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            p, stride = f"layer{stage}.{index}.", 2 if index == 0 else 1
            out = F.conv2d(bn(p + "bn1", h), state[p + "conv1.weight"], padding=1)
            out = F.prelu(bn(p + "bn2", out), state[p + "prelu.weight"])
            out = bn(p + "bn3", F.conv2d(out, state[p + "conv2.weight"], stride=stride, padding=1))
            if index == 0:
                h = bn(p + "downsample.1", F.conv2d(h, state[p + "downsample.0.weight"], stride=stride))
            h = out + h
    h = bn("bn2", h).flatten(1)
    return bn("features", F.linear(h, state["fc.weight"], state["fc.bias"]))


@pytest.mark.parametrize("depth", sorted(ARCFACE_TORCH_BLOCKS))
def test_iresnet_has_the_arcface_torch_state_dict_layout(depth):
    from id2face.components.identity.arcface import iresnet

    with torch.device("meta"):  # shapes only: no memory, no init time
        net = iresnet(depth)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == arcface_torch_layout(ARCFACE_TORCH_BLOCKS[depth])


def save_random_iresnet(path, depth: int, seed: int):
    """A random iresnet saved like an arcface_torch model-zoo ``backbone.pth``."""
    from id2face.components.identity.arcface import iresnet

    torch.manual_seed(seed)
    torch.save(randomize_norms_(iresnet(depth), seed=seed).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def arcface_r18_file(tmp_path_factory):
    return save_random_iresnet(tmp_path_factory.mktemp("arcface") / "backbone.pth", 18, seed=2)


@pytest.mark.parametrize("depth", [18, 50])
def test_arcface_loads_backbone_pth_and_matches_arcface_torch(tmp_path, arcface_r18_file, depth):
    path = arcface_r18_file if depth == 18 else save_random_iresnet(tmp_path / "backbone.pth", depth, seed=3)
    encoder = build_from_config(tmp_path, "arcface", {"weights": path, "depth": depth})
    state = torch.load(path, weights_only=True)
    assert_same_tensors(state, encoder.net)  # strict: every key, every value
    x = images(2, 112)
    with torch.no_grad():
        expected = F.normalize(arcface_torch_forward(state, (resized01(x, 112) - 0.5) / 0.5,
                                                     ARCFACE_TORCH_BLOCKS[depth]), dim=-1)
        got = encoder(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, **SAME)


def test_arcface_file_of_another_depth_is_a_one_line_user_error(arcface_r18_file):
    path = arcface_r18_file
    with pytest.raises(UserError, match=r"set depth: 18") as err:
        IDENTITY_ENCODERS.build({"name": "arcface", "params": {"weights": str(path), "depth": 34}})
    message = str(err.value)
    assert str(path) in message and "missing keys" in message and "\n" not in message


def test_arcface_rejects_a_facenet_file(facenet_release):
    _, path = facenet_release
    with pytest.raises(UserError, match="do not fit the model") as err:
        IDENTITY_ENCODERS.build({"name": "arcface", "params": {"weights": str(path), "depth": 18}})
    assert "unexpected keys" in str(err.value) and "set depth" not in str(err.value)


# ---------------------------------------------------------------- timm


@pytest.mark.parametrize("file_format", ["pt", "safetensors"])
def test_timm_loads_a_timm_state_dict_and_drops_its_classifier(tmp_path, file_format):
    import timm

    torch.manual_seed(4)
    source = randomize_norms_(timm.create_model("resnet18", pretrained=False), seed=4)  # with fc (1000)
    path = tmp_path / f"model.{file_format}"
    if file_format == "pt":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    encoder = build_from_config(tmp_path, "timm", {"model_name": "resnet18", "weights": path})
    backbone_state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert_same_tensors(backbone_state, encoder.backbone)
    x = images(2, 64)
    imagenet_mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    imagenet_std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        pooled = source.forward_head(source.forward_features((resized01(x, 112) - imagenet_mean) / imagenet_std),
                                     pre_logits=True)
        expected = F.normalize(pooled @ encoder.projection.weight.T, dim=-1)
        got = encoder(x)
    torch.testing.assert_close(got, expected, **SAME)


def test_timm_projection_is_the_same_in_every_build_and_spreads_features():
    first = IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "test_resnet", "embed_dim": 64}})
    torch.manual_seed(123)  # the global RNG must not matter
    second = IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "test_resnet", "embed_dim": 64}})
    assert torch.equal(first.projection.weight, second.projection.weight)
    # A Gaussian projection keeps distinct features distinct: near-orthogonal rows.
    w = F.normalize(first.projection.weight, dim=1)
    off_diagonal = (w @ w.T - torch.eye(64)).abs().max()
    assert off_diagonal < 0.5


def test_timm_wrong_backbone_file_and_bad_names_are_user_errors(tmp_path):
    import timm

    path = tmp_path / "resnet34.pt"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    with pytest.raises(UserError, match="do not fit the model"):
        IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "resnet18", "weights": str(path)}})
    with pytest.raises(UserError, match="close: resnet18"):
        IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "resnet_18"}})
    with pytest.raises(UserError, match="does not run on 112 px"):
        IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "vit_tiny_patch16_224"}})
    vit = IDENTITY_ENCODERS.build({"name": "timm", "params": {"model_name": "vit_tiny_patch16_224",
                                                              "model_kwargs": {"img_size": 112}}})
    assert vit(images(1, 48)).shape == (1, 512)


# ---------------------------------------------------------------- missing weights

SOURCES = {"facenet": "facenet-pytorch", "arcface": "arcface_torch", "timm": "timm"}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_missing_weights_file_names_the_path_and_the_source(tmp_path, name):
    path = tmp_path / "nowhere" / "weights.pt"
    # allow_random_init must not turn a wrong path into a silently random encoder
    params = {"weights": str(path)} | ({} if name == "timm" else {"allow_random_init": True})
    with pytest.raises(MissingWeightsError) as err:
        IDENTITY_ENCODERS.build({"name": name, "params": params})
    assert str(path) in str(err.value) and SOURCES[name] in str(err.value)


@pytest.mark.parametrize("name", ["facenet", "arcface"])
def test_null_weights_need_explicit_allow_random_init(name):
    with pytest.raises(MissingWeightsError, match="allow_random_init"):
        IDENTITY_ENCODERS.build({"name": name, "params": {"weights": None}})


def test_default_config_encoder_refuses_to_run_untrained():
    cfg = load_config()
    with pytest.raises(MissingWeightsError, match="facenet weights not found at null"):
        IDENTITY_ENCODERS.build(cfg.model.identity_encoder)


def test_unreadable_weights_file_is_a_user_error(tmp_path):
    path = tmp_path / "backbone.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        IDENTITY_ENCODERS.build({"name": "arcface", "params": {"weights": str(path), "depth": 18}})


# ---------------------------------------------------------------- the encoder contract

CONTRACT_NODES = {
    "facenet": {"name": "facenet", "params": {"allow_random_init": True}},
    "arcface": {"name": "arcface", "params": {"allow_random_init": True, "depth": 18}},
    "timm": {"name": "timm", "params": {"model_name": "resnet18"}},
}


@pytest.fixture(scope="module", params=sorted(CONTRACT_NODES))
def random_encoder(request):
    return IDENTITY_ENCODERS.build(CONTRACT_NODES[request.param])


@pytest.mark.parametrize("size", [32, 256])
def test_encoder_contract(random_encoder, size):
    encoder = random_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    x = images(3, size, seed=size).requires_grad_(True)
    e = encoder(x)
    assert e.shape == (3, 512)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(e[0], e[1])  # different images, different embeddings
    (e * torch.randn(e.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # Frozen and in eval: the same image embeds the same in a batch of one (no batch statistics).
    with torch.no_grad():
        torch.testing.assert_close(encoder(x[:1].detach()), e[:1].detach(), rtol=1e-4, atol=1e-5)


def test_weights_state_dict_is_what_weights_loads(random_encoder, request, tmp_path):
    # `train-encoder` writes weights_state_dict(): the wrappers load their file into an inner network
    node = CONTRACT_NODES[request.node.callspec.params["random_encoder"]]
    path = tmp_path / "weights.pt"
    torch.save(random_encoder.weights_state_dict(), path)
    reloaded = IDENTITY_ENCODERS.build({"name": node["name"], "params": {**node["params"], "weights": str(path)}})
    assert_same_tensors(random_encoder.state_dict(), reloaded)
    x = images(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), random_encoder(x), **SAME)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_encoders_on_cuda_match_cpu(random_encoder):
    x = images(2, 128)
    with torch.no_grad():
        expected = random_encoder(x)
        got = random_encoder.to("cuda")(x.to("cuda")).cpu()
    random_encoder.to("cpu")  # the fixture is shared with the CPU tests
    # loose: cuDNN may pick TF32 convolutions
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=2e-3)
