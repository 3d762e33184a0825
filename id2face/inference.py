"""A trained checkpoint, ready to sample: its config (from the checkpoint, else its run folder),
its frozen weights (from its state where the files it names are not on this machine), its EMA
weights, and the switches that change how it runs but not what it computes (compile, dtypes,
attention path, a tiny decoder). Used by ``anonymize``, ``eval`` and the demo."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import MissingWeightsError, UntrainedWeightsWarning, UserError, one_line


def read_checkpoint_config(checkpoint: str | Path):
    """(resolved config, state dict, where the config came from) of an ``id2face train`` checkpoint.

    The config is the one ``ID2FaceModule`` saved in the checkpoint's hyperparameters (it matches
    the weights exactly); a checkpoint without it falls back to the run folder's ``config.yaml``
    (beside ``checkpoints/``). Either is layered on the packaged default, like any config; keys
    that the current default no longer has are dropped outside ``model`` (a run, trainer or eval
    setting renamed since training says nothing about the weights) and kept, hence refused, inside.
    """
    from omegaconf import OmegaConf

    from .config import load_config

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} is a folder: name the checkpoint file in it "
                        "(a run's is checkpoints/last.ckpt)")
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} does not exist")
    try:  # a Lightning checkpoint of the user's own training run (trusted: full unpickling)
        payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling complaint means "not a checkpoint"
        raise UserError(f"{checkpoint} cannot be read as a checkpoint: {one_line(err)}") from None
    if not isinstance(payload, Mapping) or not isinstance(payload.get("state_dict"), Mapping):
        raise UserError(f"{checkpoint} is not an id2face training checkpoint (no state_dict in it)")
    saved = (payload.get("hyper_parameters") or {}).get("config")
    source = f"{checkpoint} (hyperparameters)"
    if saved is None:
        folder = checkpoint.resolve().parent
        run_config = (folder.parent if folder.name == "checkpoints" else folder) / "config.yaml"
        if not run_config.is_file():
            raise UserError(f"{checkpoint} stores no config and there is no {run_config}: "
                            "cannot tell which model it holds")
        saved, source = OmegaConf.to_container(OmegaConf.load(run_config), resolve=True), str(run_config)
    saved = OmegaConf.to_container(OmegaConf.create(saved), resolve=True)
    default = load_config([])
    dropped = [f"{section}.{key}" for section in list(saved) if section != "model"
               for key in _drop_stale(saved, section, default)]
    if dropped:
        source += f"; dropped settings this version no longer has: {', '.join(k.rstrip('.') for k in dropped)}"
    cfg = load_config(base=saved, base_source=f"{checkpoint}'s config")
    return cfg, payload["state_dict"], source


def _drop_stale(parent: dict, key: str, reference) -> list[str]:
    """Remove from ``parent[key]`` (recursively) what ``reference[key]`` does not define; component
    nodes (``{name, params}``) are kept whole. Returns the removed paths relative to ``key``."""
    from omegaconf import DictConfig

    if key not in reference:
        parent.pop(key)
        return [""]
    node, ref = parent[key], reference[key]
    component = isinstance(ref, DictConfig) and "name" in ref and set(ref) <= {"name", "params"}
    if component or not (isinstance(node, dict) and isinstance(ref, DictConfig)):
        return []
    return [f"{child}.{rest}" if rest else child for child in list(node) for rest in _drop_stale(node, child, ref)]


def inference_overrides(model_cfg, compile: bool = False, first_stage_dtype: str | None = None,
                        unet_dtype: str | None = None, harmonizer_attention: str | None = None,
                        attention_backends: list[str] | None = None) -> list[str]:
    """``key=value`` overrides that change how a model runs, not its weights: the speed switches
    (``compile``), the dtypes of an autoencoder first stage and of the UNet, the decoupled
    harmonizers' attention path (same values) and the UNet's SDPA backends in order of preference;
    a role whose variant lacks the switch is a UserError, except the attention path, which a
    harmonizer without one ignores."""
    from .model import speed_switch_overrides
    from .registry import MODEL_ROLES, variant_name

    overrides = speed_switch_overrides(model_cfg) if compile else []
    for role, dtype, takes_one in (("first_stage", first_stage_dtype, "the autoencoders sd_vae and taesd"),
                                   ("backbone", unet_dtype, "unet")):
        if dtype is None:
            continue
        name = variant_name(model_cfg[role])
        if not MODEL_ROLES[role].declares(name, "dtype"):
            raise UserError(f"the checkpoint's {role.replace('_', ' ')} ({name}) has no dtype of its own: it runs "
                            f"in the sampling precision (only {takes_one} take one)")
        overrides.append(f"model.{role}.params.dtype={dtype}")
    backbone = variant_name(model_cfg["backbone"])
    if attention_backends:
        if not MODEL_ROLES["backbone"].declares(backbone, "sdpa_backends"):
            raise UserError(f"the checkpoint's backbone ({backbone}) has no choice of attention backends "
                            "(only unet has)")
        overrides.append(f"model.backbone.params.sdpa_backends=[{','.join(attention_backends)}]")
    harmonizer = variant_name(model_cfg["harmonizer"])
    if harmonizer_attention is not None and MODEL_ROLES["harmonizer"].declares(harmonizer, "attention"):
        overrides.append(f"model.harmonizer.params.attention={harmonizer_attention}")
    return overrides


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu", compile: bool = False,
               first_stage_dtype: str | None = None, tiny_decoder: str | Path | None = None,
               unet_dtype: str | None = None, harmonizer_attention: str | None = None, tiny_encoder: bool = False,
               attention_backends: list[str] | None = None):
    """The ``ID2Face`` of a training checkpoint with its EMA weights (the ones ``ID2FaceModule``
    samples with), in eval mode on ``device``; returns ``(model, cfg, info)``. ``compile``: the
    speed switches on (channels_last + torch.compile of the UNet and an SD VAE first stage),
    whatever the checkpoint trained with; ``first_stage_dtype``: an SD VAE's weights and arithmetic
    in that dtype (``model.first_stage.params.dtype``); ``tiny_decoder``: a local AutoencoderTiny
    folder that decodes instead of the checkpoint's first stage (``DecoderSwap``; the same dtype
    and speed switches), and with ``tiny_encoder`` encodes too; ``unet_dtype``: the UNet's (and
    harmonizer's) weights and arithmetic in that dtype (``model.backbone.params.dtype``);
    ``harmonizer_attention``: a decoupled harmonizer's attention path (``weights`` | ``sdpa``, same
    values); ``attention_backends``: the UNet's SDPA kernels in order of preference
    (``model.backbone.params.sdpa_backends``). All change how the model runs, not its trained
    weights (loaded in fp32, then cast)."""
    from omegaconf import OmegaConf

    from .config import merge_layer, parse_overrides

    if tiny_encoder and tiny_decoder is None:
        raise UserError("a tiny encoder is the tiny decoder's autoencoder: give its folder (--tiny-decoder DIR)")
    cfg, state, source = read_checkpoint_config(checkpoint)
    overrides = inference_overrides(cfg.model, compile, first_stage_dtype, unet_dtype, harmonizer_attention,
                                    attention_backends)
    if overrides:
        cfg = merge_layer(cfg, parse_overrides(overrides), "anonymize's speed switches")
    module, cfg, frozen_from_state = module_for_checkpoint(cfg, state)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{checkpoint} does not match the model its config describes: "
                        f"{one_line(err)}") from None
    averaged = int(getattr(module.ema, "n_averaged", torch.tensor(0)).item())
    if averaged > 0:  # copy the EMA weights in (the same pairing ID2FaceModule swaps with)
        with torch.no_grad():
            for live, average in zip(module.model.trainable_modules().parameters(), module.ema.module.parameters(),
                                     strict=True):
                live.copy_(average)
    model = module.model
    if tiny_decoder is not None:
        model.first_stage = with_tiny_decoder(model.first_stage, tiny_decoder, also_encodes=tiny_encoder,
                                              channels_last=compile, compile=compile, dtype=first_stage_dtype)
    model = model.to(device).eval()
    info = {"checkpoint": str(checkpoint), "config_source": source, "ema_weights": averaged > 0,
            "ema_updates": averaged, "compiled": bool(compile), "first_stage_dtype": first_stage_dtype,
            "unet_dtype": unet_dtype, "tiny_decoder": None if tiny_decoder is None else str(tiny_decoder),
            "tiny_encoder": bool(tiny_encoder),
            "harmonizer_attention": OmegaConf.select(cfg, "model.harmonizer.params.attention"),
            "attention_backends": list(OmegaConf.select(cfg, "model.backbone.params.sdpa_backends") or []) or None,
            "frozen_weights_from_checkpoint": frozen_from_state}
    return model, cfg, info


def module_for_checkpoint(cfg, state: Mapping[str, Any]):
    """``(ID2FaceModule(cfg), cfg, frozen_from_state)`` for a checkpoint's config and state. A
    checkpoint made on another machine may name weight files that are not here; its state carries
    the frozen roles' weights, so those roles are then built without their files (the caller's
    strict ``load_state_dict`` fills them) and ``frozen_from_state`` is True. Either way the state
    replaces every frozen weight, so a role's "untrained init" warning would be false here."""
    import warnings

    from .config import merge_layer, parse_overrides
    from .lit_module import ID2FaceModule

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntrainedWeightsWarning)
        try:
            return ID2FaceModule(cfg), cfg, False
        except MissingWeightsError:
            overrides = frozen_weights_from_state(cfg.model, state)
            if not overrides:
                raise
            cfg = merge_layer(cfg, parse_overrides(overrides), "frozen weights from the checkpoint")
            return ID2FaceModule(cfg), cfg, True


def frozen_weights_from_state(model_cfg, state: Mapping[str, Any]) -> list[str]:
    """Overrides that build the frozen roles (identity encoder, first stage) without their weight
    files, for each role whose weights ``state`` (a training checkpoint's) carries."""
    from .model import FROZEN_ROLES
    from .registry import MODEL_ROLES, variant_name

    overrides = []
    for role in FROZEN_ROLES:
        if not any(key.startswith(f"model.{role}.") for key in state):
            continue
        name = variant_name(model_cfg[role])
        for param, value in (("weights", "null"), ("path", "null"), ("allow_random_init", "true"),
                             ("random_init", "true")):
            if MODEL_ROLES[role].declares(name, param):
                overrides.append(f"model.{role}.params.{param}={value}")
    return overrides


def with_tiny_decoder(first_stage, path: str | Path | None, *, also_encodes: bool = False,
                      channels_last: bool = False, compile: bool = False, dtype: str | None = None,
                      random_init: bool = False):
    """``first_stage`` that decodes with the tiny autoencoder at ``path`` (``random_init``: an
    untrained one of TAESD's architecture, for benchmarks); UserError if its latents are not that
    first stage's. ``also_encodes``: the tiny autoencoder encodes too (the masked image's latents
    then approximate the first stage's: TAESD's encoder is distilled from the SD VAE's, as
    real-time SD pipelines use it), ~1/9 of an SD VAE encode's arithmetic at 512 px."""
    from .components.backbone import DecoderSwap, TinyVAEFirstStage

    decoder = TinyVAEFirstStage(path=None if path is None else str(path), random_init=random_init,
                                channels_last=channels_last, compile=compile, dtype=dtype)
    swap = DecoderSwap(first_stage, decoder)  # refuses a decoder of another latent space
    return decoder if also_encodes else swap
