"""SynthFaces oracle: a held-out judge trained on the renderer's ground truth.

One small CNN (BatchNorm trunk, its own seed; nothing shared with the training-time identity
encoder) with three heads, trained on views of SynthFaces identities that the evaluation data never
renders (sample indices from ``sample_offset``):
- an identity embedding (unit, cosine) learned through a CosFace classifier over the identities:
  the ``oracle`` recognizer;
- regressors of the identity factors and of the attribute factors (pose, expression, ...):
  ``OracleAttributeEstimator`` and the factor-level identity change.

``train_oracle(config, cache_dir)`` caches the result under ``<cache_dir>/oracle-<hash>/``
(``oracle.pt``, ``config.json``, ``metrics.json``), the hash covering every field of
``OracleConfig`` and the format version: the same config is trained once. Training runs on
``TRAINING_THREADS`` CPU threads whatever the machine has, so the judge is a function of its config
and the processor's kind, not of the core count (float sums split over more threads round otherwise).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from ..errors import MissingWeightsError, UserError
from ..registry import to_plain
from ..user_cache import user_cache

ORACLE_FORMAT = 1
ORACLE_SOURCE = "`id2face train-oracle CONFIG...` with the evaluation config (cached by config hash)"
FEATURE_DIM = 256               # penultimate width (the FID features of OracleFeatures)
POSE_NAMES = ("yaw", "pitch", "roll")
EXPRESSION_NAMES = ("smile", "mouth_open", "eye_open", "brow_raise", "gaze_x")
TRAINING_THREADS = 2


def default_cache_dir() -> Path:
    return user_cache("oracle")


@dataclass(frozen=True)
class OracleConfig:
    """Everything that determines a trained oracle (and so its cache key)."""

    image_size: int = 32
    renderer_seed: int = 0          # SynthFaces `seed`: which people exist
    num_identities: int = 200       # identities 0 .. num_identities-1 (cover the evaluation data)
    samples_per_identity: int = 32
    sample_offset: int = 100_000    # training views start here: the evaluation data renders 0, 1, ...
    width: int = 16
    embed_dim: int = 64
    seed: int = 1234
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    margin: float = 0.2             # CosFace additive margin
    scale: float = 16.0             # CosFace logit scale

    def __post_init__(self) -> None:
        # A setting that trains no judge (steps=-5: NaN losses, chance accuracy, cached as a judge)
        # or fails deep inside (steps=abc) is one line naming it.
        from ..config import check_whole_number

        lowest = {"image_size": 1, "renderer_seed": 0, "num_identities": 2, "samples_per_identity": 1,
                  "sample_offset": 0, "width": 1, "embed_dim": 1, "seed": 0, "steps": 1, "batch_size": 1}
        for name, low in lowest.items():
            check_whole_number(f"oracle.{name}", getattr(self, name), low)
            object.__setattr__(self, name, int(float(getattr(self, name))))
        ranges = {"lr": (0.0, False), "weight_decay": (0.0, True), "margin": (0.0, True), "scale": (0.0, False)}
        for name, (low, inclusive) in ranges.items():
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < low or (value == low and not inclusive):
                raise UserError(f"oracle.{name} takes a number {'>=' if inclusive else '>'} {low:g}, got {value!r}")
            object.__setattr__(self, name, float(value))

    def key(self) -> str:
        payload = json.dumps({"format": ORACLE_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def _plain(node) -> dict:
    return dict(to_plain(node)) if node is not None else {}


def oracle_config(data: Mapping[str, Any], settings: Mapping[str, Any] | None = None) -> OracleConfig:
    """The oracle for an evaluation ``data`` config section (SynthFaces only) + its own ``settings``."""
    data = _plain(data)
    dataset = _plain(data.get("dataset"))
    if dataset.get("name") != "synthfaces":
        raise UserError(f"the oracle judges SynthFaces only; data.dataset.name is '{dataset.get('name')}' "
                        "(use the `dlib` or `encoder` recognizer on real faces)")
    params = _plain(dataset.get("params"))
    values: dict[str, Any] = {
        "image_size": int(data.get("image_size", params.get("image_size", 32))),
        "renderer_seed": int(params.get("seed", 0)),
        "num_identities": int(params.get("identity_offset", 0)) + int(params.get("num_identities", 200)),
    }
    settings = _plain(settings)
    unknown = sorted(set(settings) - set(OracleConfig.fields()))
    if unknown:
        raise UserError(f"unknown oracle setting(s) {', '.join(unknown)}; valid: {', '.join(OracleConfig.fields())}")
    values.update(settings)
    return OracleConfig(**values)


def check_fits(config: OracleConfig, data: Mapping[str, Any], source: str | Path) -> None:
    """Refuse an oracle trained on other SynthFaces people, or at another size, than ``data`` renders
    (its identity head would judge strangers); ``data`` of another dataset is not checked here."""
    if _plain(_plain(data).get("dataset")).get("name") != "synthfaces":
        return
    needed = oracle_config(data)
    wrong = [f"{name} {getattr(config, name)} (the data's: {getattr(needed, name)})"
             for name in ("renderer_seed", "image_size") if getattr(config, name) != getattr(needed, name)]
    if config.num_identities < needed.num_identities:
        wrong.append(f"num_identities {config.num_identities} (the data renders {needed.num_identities})")
    if wrong:
        raise UserError(f"oracle {source} was trained for other SynthFaces data: {'; '.join(wrong)}; "
                        "train one for this data with `id2face train-oracle CONFIG`")


def _block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class OracleNet(nn.Module):
    """images [-1, 1] NCHW -> unit identity embedding and normalised factor predictions.

    ``embed(images) -> (N, embed_dim)``; ``predict_factors(images) -> (id (N, 14), attr (N, 25))``
    in SynthFaces' normalised units (``id2face.data.synthfaces.IDENTITY_FACTORS`` /
    ``ATTRIBUTE_FACTORS`` order).
    """

    def __init__(self, config: OracleConfig, num_id_factors: int, num_attr_factors: int):
        super().__init__()
        self.config = config
        self.embed_dim = config.embed_dim
        self.num_id_factors = num_id_factors
        w = config.width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.trunk = nn.Sequential(
                _block(3, w, 1), _block(w, w, 1), nn.MaxPool2d(2),
                _block(w, 2 * w, 1), _block(2 * w, 2 * w, 1), nn.MaxPool2d(2),
                _block(2 * w, 4 * w, 1), _block(4 * w, 4 * w, 1),
                # a 4x4 grid, not a global pool: pose and expression are *where* features are
                nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                nn.Linear(4 * w * 16, FEATURE_DIM), nn.ReLU(inplace=True))
            self.embedding = nn.Linear(FEATURE_DIM, config.embed_dim)
            self.classifier = nn.Parameter(torch.randn(config.num_identities, config.embed_dim) * 0.01)
            self.factors = nn.Linear(FEATURE_DIM, num_id_factors + num_attr_factors)
        self.register_buffer("factor_mean", torch.zeros(num_id_factors + num_attr_factors))
        self.register_buffer("factor_std", torch.ones(num_id_factors + num_attr_factors))
        self.summary = "untrained"

    def _features(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=images.shape[-1] > size)
        return self.trunk(images.float())

    def _heads(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self._features(images)
        return torch.nn.functional.normalize(self.embedding(features), dim=-1), self.factors(features)

    def embed(self, images: Tensor) -> Tensor:
        return self._heads(images)[0]

    def predict_factors(self, images: Tensor) -> tuple[Tensor, Tensor]:
        factors = self._heads(images)[1] * self.factor_std + self.factor_mean
        return factors[:, :self.num_id_factors], factors[:, self.num_id_factors:]

    def cosface_logits(self, embeddings: Tensor, labels: Tensor | None = None) -> Tensor:
        cosine = embeddings @ torch.nn.functional.normalize(self.classifier, dim=-1).T
        if labels is not None:
            cosine = cosine - self.config.margin * torch.nn.functional.one_hot(labels, cosine.shape[1])
        return self.config.scale * cosine


def _render(config: OracleConfig, samples: range) -> dict[str, Tensor]:
    from ..data.synthfaces import render_sample

    items = [render_sample(i, s, config.image_size, config.renderer_seed)
             for i in range(config.num_identities) for s in samples]
    return {"image": torch.stack([it["image"] for it in items]),
            "identity": torch.tensor([it["identity"] for it in items]),
            "factors": torch.stack([torch.cat([it["id_factors"], it["attr_factors"]]) for it in items])}


def _evaluate(net: OracleNet, val: dict[str, Tensor], train: dict[str, Tensor]) -> dict[str, float]:
    """Held-out views: identification accuracy, retrieval top-1 against the training views, factor errors."""
    from ..data.synthfaces import ATTRIBUTE_FACTORS, POSE_DEGREES

    net.eval()
    with torch.no_grad():
        embeddings = torch.cat([net.embed(x) for x in val["image"].split(256)])
        gallery = torch.cat([net.embed(x) for x in train["image"].split(256)])
        id_pred, attr_pred = zip(*[net.predict_factors(x) for x in val["image"].split(256)])
        predicted = torch.cat([torch.cat(id_pred), torch.cat(attr_pred)], dim=1)
        classified = net.cosface_logits(embeddings).argmax(1)
        nearest = train["identity"][(embeddings @ gallery.T).argmax(1)]
    error = (predicted - val["factors"]).abs()
    n_id = net.num_id_factors
    pose_index = [n_id + ATTRIBUTE_FACTORS.index(name) for name in POSE_NAMES]
    pose_deg = torch.stack([error[:, i] * POSE_DEGREES[name] for i, name in zip(pose_index, POSE_NAMES)], 1)
    expression_index = [n_id + ATTRIBUTE_FACTORS.index(name) for name in EXPRESSION_NAMES]
    return {
        "val_identification_accuracy": (classified == val["identity"]).float().mean().item(),
        "val_retrieval_top1": (nearest == val["identity"]).float().mean().item(),
        "val_id_factor_mae": error[:, :n_id].mean().item(),
        "val_pose_mae_degrees": pose_deg.mean().item(),
        "val_expression_mae": error[:, expression_index].mean().item(),
        "num_val_images": len(val["identity"]),
    }


def _log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def oracle_dir(config: OracleConfig, cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or default_cache_dir()).expanduser() / f"oracle-{config.key()}"


def train_oracle(config: OracleConfig, cache_dir: str | Path | None = None, force: bool = False,
                 log: Callable[[str], None] = _log_to_stderr) -> OracleNet:
    """Train (or load from the cache) the oracle for ``config``; see the module docstring."""
    folder = oracle_dir(config, cache_dir)
    if (folder / "oracle.pt").is_file() and not force:
        log(f"oracle: cache hit {folder}")
        return load_oracle(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        net, metrics = _train(config, log)
    finally:
        torch.set_num_threads(threads)
    _save(net, metrics, folder)
    log(f"oracle: saved {folder} ({net.summary})")
    return net.eval()


def _train(config: OracleConfig, log: Callable[[str], None]) -> tuple[OracleNet, dict[str, float]]:
    from ..data.synthfaces import ATTRIBUTE_FACTORS, IDENTITY_FACTORS

    start = time.perf_counter()
    log(f"oracle: rendering {config.num_identities} identities x {config.samples_per_identity} views "
        f"at {config.image_size} px")
    first = config.sample_offset
    train = _render(config, range(first, first + config.samples_per_identity))
    val = _render(config, range(first + config.samples_per_identity, first + config.samples_per_identity + 2))

    net = OracleNet(config, len(IDENTITY_FACTORS), len(ATTRIBUTE_FACTORS))
    net.factor_mean.copy_(train["factors"].mean(0))
    net.factor_std.copy_(train["factors"].std(0).clamp_min(1e-3))
    targets = (train["factors"] - net.factor_mean) / net.factor_std
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=max(config.steps, 1),
                                                   pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    net.train()
    history = []
    for step in range(config.steps):
        batch = torch.randint(0, len(targets), (config.batch_size,), generator=generator)
        # mirrored views help the identity head; the factor head only learns from unmirrored ones
        # (mirroring flips the signs of yaw, roll, gaze, lighting, hair parting, ...)
        mirrored = torch.rand(len(batch), generator=generator) < 0.5
        images = train["image"][batch]
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
        embeddings, factors = net._heads(images)
        id_loss = torch.nn.functional.cross_entropy(net.cosface_logits(embeddings, train["identity"][batch]),
                                                    train["identity"][batch])
        upright = (~mirrored).float()
        factor_loss = ((factors - targets[batch]).square().mean(1) * upright).sum() / upright.sum().clamp_min(1)
        loss = id_loss + factor_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append((id_loss.item(), factor_loss.item()))
        if (step + 1) % max(1, config.steps // 10) == 0 or step + 1 == config.steps:
            window = history[-max(1, config.steps // 10):]
            log(f"oracle: step {step + 1}/{config.steps} identity loss {sum(h[0] for h in window) / len(window):.3f} "
                f"factor loss {sum(h[1] for h in window) / len(window):.3f}")
    metrics = _evaluate(net, val, train)
    k = max(1, min(20, config.steps // 5))
    metrics.update({
        "train_seconds": round(time.perf_counter() - start, 1),
        "first_identity_loss": sum(h[0] for h in history[:k]) / k if history else math.nan,
        "last_identity_loss": sum(h[0] for h in history[-k:]) / k if history else math.nan,
        "first_factor_loss": sum(h[1] for h in history[:k]) / k if history else math.nan,
        "last_factor_loss": sum(h[1] for h in history[-k:]) / k if history else math.nan,
    })
    net.summary = _summary(config, metrics)
    return net, metrics


def weights_digest(net: nn.Module) -> str:
    """Eight hex digits of the weights: which judge this is. Two oracles of one config trained on
    processors of different kinds have different weights, and judge differently."""
    digest = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:8]


def _summary(config: OracleConfig, metrics: Mapping[str, float]) -> str:
    return (f"{config.num_identities} identities, held-out views: top-1 {metrics['val_retrieval_top1']:.2f}, "
            f"pose MAE {metrics['val_pose_mae_degrees']:.1f} deg")


def _save(net: OracleNet, metrics: Mapping[str, float], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"format": ORACLE_FORMAT, "config": dataclasses.asdict(net.config), "metrics": dict(metrics),
               "num_id_factors": net.num_id_factors,
               "num_attr_factors": net.factors.out_features - net.num_id_factors,
               "state_dict": net.state_dict()}
    tmp = folder / f"oracle.pt.tmp{os.getpid()}"
    torch.save(payload, tmp)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(net.config), indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(dict(metrics), indent=2) + "\n")
    os.replace(tmp, folder / "oracle.pt")  # atomic: a concurrent reader never sees half a file


def load_oracle(path: str | Path) -> OracleNet:
    """An oracle from its folder or ``oracle.pt`` (eval mode, frozen)."""
    path = Path(path).expanduser()
    file = path / "oracle.pt" if path.is_dir() or path.suffix != ".pt" else path
    if not file.is_file():
        raise MissingWeightsError("SynthFaces oracle", file, ORACLE_SOURCE)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        config = OracleConfig(**payload["config"])
        net = OracleNet(config, payload["num_id_factors"], payload["num_attr_factors"])
        net.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"{file} is not an id2face oracle of format {ORACLE_FORMAT}: {err}") from None
    metrics = payload.get("metrics") or {}
    net.summary = _summary(config, metrics) if "val_retrieval_top1" in metrics else "trained"
    net.requires_grad_(False)
    return net.eval()


def load_cached_oracle(config: OracleConfig, cache_dir: str | Path | None = None) -> OracleNet:
    return load_oracle(oracle_dir(config, cache_dir))


class OracleFeatures(nn.Module):
    """The oracle's penultimate features (N, FEATURE_DIM): a SynthFaces-trained FID feature extractor."""

    num_features = FEATURE_DIM

    def __init__(self, net: OracleNet):
        super().__init__()
        self.net = net

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net._features(images)


class OracleAttributeEstimator(nn.Module):
    """images -> (N, 8) oracle estimates [yaw, pitch, roll (degrees), smile, mouth_open, eye_open,
    brow_raise, gaze_x (normalised SynthFaces units)]; same interface as ``LandmarkAttributeEstimator``.

    ``from_factors(attr_factors)`` maps ground-truth SynthFaces attribute vectors to the same columns,
    so anonymized estimates can be compared with the source's true attributes.
    """

    attribute_names = POSE_NAMES + EXPRESSION_NAMES
    groups = {"pose": POSE_NAMES, "expression": EXPRESSION_NAMES}
    periodic = ()

    def __init__(self, net: OracleNet):
        super().__init__()
        self.net = net

    @staticmethod
    def from_factors(attr_factors: Tensor) -> Tensor:
        from ..data.synthfaces import ATTRIBUTE_FACTORS, POSE_DEGREES

        columns = [attr_factors[:, ATTRIBUTE_FACTORS.index(name)] * POSE_DEGREES[name] for name in POSE_NAMES]
        columns += [attr_factors[:, ATTRIBUTE_FACTORS.index(name)] for name in EXPRESSION_NAMES]
        return torch.stack(columns, dim=-1)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.from_factors(self.net.predict_factors(images)[1])
