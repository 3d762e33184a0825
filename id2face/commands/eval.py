"""`id2face eval --checkpoint CKPT [CONFIG...] [key=value...] [--run-dir DIR] [--limit N]`.

Anonymizes the test split of the configured data (identity-disjoint from training) and writes
``metrics.json`` (``id2face.metrics.table`` format) and ``eval_config.yaml`` into the run folder
(default: the folder above the checkpoint's ``checkpoints/``, else the checkpoint's folder).

Config: the checkpoint's saved config <- CONFIG files <- key=value (``eval.*`` chooses the
recognizers, FID weights, FAR, K for diversity; ``model.sampler.params.num_inference_steps`` the
sampling steps). Per recognizer: retrieval top-1/top-5, verification rate at ``eval.far``, diversity
over ``eval.diversity_k`` anonymizations. FID: Inception from ``eval.fid.weights``; without it the
SynthFaces oracle's features when the oracle is a recognizer, else not computed. Attributes: the
oracle's factor regressors against the source's true factors on SynthFaces, else MTCNN landmarks
(pose, expression) of original vs anonymized. PSNR/SSIM of the own-identity reconstruction.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..precision import PRECISION_CHOICES
from . import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="FILE|key=value",
                        help="config files then key=value overrides, layered on the checkpoint's config")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="Lightning checkpoint of id2face train")
    parser.add_argument("--run-dir", metavar="DIR", help="where metrics.json goes (default: the checkpoint's training "
                                                          "run folder; for a checkpoint outside one, runs/eval/NAME)")
    parser.add_argument("--limit", type=int, metavar="N",
                        help="evaluate the first N test faces only (smoke runs; sets eval.limit)")
    parser.add_argument("--no-reconstruction", action="store_true", help="skip the PSNR/SSIM reconstruction pass")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="sampling arithmetic (default auto: the config's trainer.precision on cuda, 32-true on "
                             "cpu); recorded in metrics.json")


def training_run_dir(checkpoint: Path) -> Path:
    """The run folder ``id2face train`` wrote ``checkpoint`` into (``<run>/checkpoints/x.ckpt``)."""
    parent = checkpoint.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def default_run_dir(checkpoint: Path) -> Path:
    """Where metrics go by default: the training run folder when there is one (its config.yaml),
    else ``runs/eval/<checkpoint name>``: an exported checkpoint may sit anywhere (the demo's in the
    repository's checkpoints/), and its folder is nobody's run folder to write into."""
    run = training_run_dir(checkpoint)
    return run if (run / "config.yaml").is_file() else Path("runs") / "eval" / checkpoint.stem


def _checkpoint_config(checkpoint: Path, files, overrides):
    """The checkpoint's own config (what its weights are) <- CONFIG files <- key=value."""
    from ..config import load_config
    from ..inference import read_checkpoint_config

    cfg, state, _ = read_checkpoint_config(checkpoint)
    if not files and not overrides:
        return cfg, state
    return load_config(files, overrides, base=cfg, base_source=f"{checkpoint}'s config"), state


def _recognizer_key(node, taken: set) -> str:
    name = node if isinstance(node, str) else str(node["name"])
    if name == "encoder" and not isinstance(node, str):
        inner = (node.get("params") or {}).get("encoder")
        name = inner if isinstance(inner, str) else (inner or {}).get("name", name)
    key, i = name, 2
    while key in taken:
        key, i = f"{name}-{i}", i + 1
    taken.add(key)
    return key


def build_judges(cfg) -> tuple[dict, Any]:
    """The recognizers (by name) and the FID metric (or None) that ``cfg.eval`` names, on the CPU:
    all that evaluation reads from disk or trains (an oracle with ``train_if_missing``), so a sweep
    task can fail on a missing judge before its training, not after."""
    from ..errors import UserError
    from ..metrics import build_fid
    from ..metrics.oracle import OracleFeatures
    from ..metrics.recognizers import OracleRecognizer, build_recognizer
    from ..registry import recognizer_nodes

    eval_cfg = cfg.eval
    taken: set = set()
    recognizers = {_recognizer_key(node, taken): build_recognizer(node, data=cfg.data)
                   for node in recognizer_nodes(eval_cfg)}
    if not recognizers:
        raise UserError("eval.recognizers is empty: name at least one (dlib, oracle, encoder)")
    oracle = next((r.net for r in recognizers.values() if isinstance(r, OracleRecognizer)), None)
    weights = eval_cfg.fid.get("weights")
    if weights:
        return recognizers, build_fid(weights=weights)
    if oracle is not None:
        fid = build_fid(feature_extractor=OracleFeatures(oracle))
        fid.convention = f"FID on SynthFaces-oracle features ({OracleFeatures.num_features}-d), real vs anonymized"
        return recognizers, fid
    return recognizers, None


def evaluate(module, cfg, reconstruction: bool = True, device: str = "cpu",
             progress: bool = True, generate: str = "anonymize", split_file: Path | None = None,
             precision: str | None = None, judges: tuple[dict, Any] | None = None) -> tuple[dict, dict]:
    """Run every metric of ``cfg.eval`` on the test split; returns (metrics, meta) for save_metrics.

    ``generate``: ``anonymize`` (the method) or ``reconstruct`` (own identity: the baseline that
    shows what the metrics read when no identity is removed). ``split_file``: the run's split.
    ``precision``: of the sampling only (``id2face.precision``; None: the config's on CUDA, fp32 on
    CPU); recognizers, FID and attribute estimators always run in fp32. ``judges``: what
    ``build_judges(cfg)`` returned, if the caller built them already.
    """
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from ..data.datamodule import FacePairDataModule
    from ..errors import UserError
    from ..metrics import (AttributePreservation, IdentityDiversity, IdentityRetrieval, LandmarkAttributeEstimator,
                           VerificationRate)
    from ..metrics.oracle import OracleAttributeEstimator
    from ..metrics.recognizers import OracleRecognizer
    from ..precision import autocast, resolve_precision

    eval_cfg = cfg.eval  # its counts (limit, batch_size, diversity_k) were checked by load_config
    if not 0 <= float(eval_cfg.far) <= 1:
        raise UserError(f"eval.far must be in [0, 1], got {eval_cfg.far}")
    precision = resolve_precision(precision, device, OmegaConf.select(cfg, "trainer.precision"))
    datamodule = FacePairDataModule(cfg.data, split_file=split_file if split_file and Path(split_file).is_file() else None)
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    if eval_cfg.get("limit") is not None:
        dataset = Subset(dataset, range(min(int(eval_cfg.limit), len(dataset))))
    if len(dataset) < 2:
        raise UserError(f"the test split has {len(dataset)} face(s); evaluation needs at least 2")
    loader = DataLoader(dataset, batch_size=int(eval_cfg.batch_size), shuffle=False,
                        num_workers=int(cfg.data.get("num_workers", 0)))

    recognizers, fid = judges if judges is not None else build_judges(cfg)
    recognizers = {name: recognizer.to(device) for name, recognizer in recognizers.items()}
    fid = fid.to(device) if fid is not None else None
    k = int(eval_cfg.diversity_k)
    far = float(eval_cfg.far)
    retrieval = {n: IdentityRetrieval(metric=r.metric).to(device) for n, r in recognizers.items()}
    verification = {n: VerificationRate(far=far, metric=r.metric).to(device) for n, r in recognizers.items()}
    diversity = {n: IdentityDiversity(metric=r.metric).to(device) for n, r in recognizers.items()} if k > 1 else {}

    oracle = next((r.net for r in recognizers.values() if isinstance(r, OracleRecognizer)), None)
    if oracle is not None:
        estimator = OracleAttributeEstimator(oracle)
        attribute_note = ("SynthFaces oracle regressors on the anonymized face vs the source's true factors "
                          "(pose in degrees; expression in normalised factor units)")
        from ..data.synthfaces import IDENTITY_FACTORS

        id_change = AttributePreservation(IDENTITY_FACTORS, groups={"all": IDENTITY_FACTORS}).to(device)
    else:
        estimator = LandmarkAttributeEstimator()
        attribute_note = "MTCNN 5-point geometric pose (degrees) and expression ratios, original vs anonymized"
        id_change = None
    attributes = AttributePreservation(estimator.attribute_names, groups=estimator.groups,
                                       periodic=estimator.periodic).to(device)
    if reconstruction:
        psnr, ssim = (metric.to(device) for metric in reconstruction_metrics())

    module = module.to(device).eval()
    seed = int(cfg.run.seed)
    detected: dict[str, list] = {}
    with torch.no_grad(), module.ema_weights():
        for index, batch in enumerate(tqdm(loader, desc="id2face eval", unit="batch", disable=not progress,
                                           file=sys.stderr)):
            images = batch["image"].to(device)
            masks = batch["mask"].to(device).to(images.dtype)
            identities = batch["identity"].to(device)
            with autocast(precision, device):
                samples = [getattr(module.model, generate)(images, masks, generator=torch.Generator(device).manual_seed(
                    seed * 1_000_003 + index * 101 + j)) for j in range(k)]
            anonymized = samples[0]
            for name, recognizer in recognizers.items():
                original_emb, anonymized_emb = recognizer(images), recognizer(anonymized)
                if hasattr(recognizer, "last_detected"):  # dlib: did its detector find the anonymized face?
                    detected.setdefault(name, []).append(recognizer.last_detected.float())
                retrieval[name].update(original_emb, anonymized_emb, identities)
                verification[name].update(original_emb, anonymized_emb, identities)
                if name in diversity:
                    diversity[name].update(torch.stack([anonymized_emb] + [recognizer(s) for s in samples[1:]], 1))
            if fid is not None:
                fid.update(images, real=True)
                fid.update(anonymized, real=False)
            if oracle is not None and "attr_factors" in batch:
                attributes.update(estimator.from_factors(batch["attr_factors"].to(device)), estimator(anonymized))
                id_change.update(batch["id_factors"].to(device), oracle.predict_factors(anonymized)[0])
            else:
                attributes.update(estimator(images), estimator(anonymized))
            if reconstruction:
                with autocast(precision, device):
                    rebuilt = module.model.reconstruct(images, masks, generator=torch.Generator(device).manual_seed(
                        seed * 1_000_003 + index * 101 + 97))
                psnr.update(rebuilt, images)
                ssim.update(rebuilt, images)

    metrics: dict[str, float] = {}
    for name in recognizers:
        r = retrieval[name].compute()
        metrics[f"{name}/top1"], metrics[f"{name}/top5"] = r["top1"].item(), r["top5"].item()
        try:
            v = verification[name].compute()
            metrics.update({f"{name}/vr": v["rate"].item(), f"{name}/vr_threshold": v["threshold"].item(),
                            f"{name}/far": v["far"].item(), f"{name}/tar": v["tar"].item()})
        except UserError as err:  # unlabelled test set: no calibration possible
            print(f"id2face eval: {name}: verification rate skipped: {err}", file=sys.stderr)
        if name in diversity:
            metrics[f"{name}/diversity"] = diversity[name].compute().item()
        if name in detected:
            metrics[f"{name}/detected"] = torch.cat(detected[name]).mean().item()
    if fid is not None:
        metrics["fid"] = fid.compute().item()
    a = attributes.compute()
    metrics.update({"pose": a["pose"].item(), "expression": a["expression"].item(),
                    "attributes_valid": a["valid"].item()})
    metrics.update({f"pose/{n}": a[n].item() for n in estimator.groups["pose"]})
    if id_change is not None:
        metrics["id_factor_change"] = id_change.compute()["all"].item()
    if reconstruction:
        metrics["psnr"], metrics["ssim"] = psnr.compute().item(), ssim.compute().item()
    meta = {
        "num_faces": len(dataset), "diversity_k": k, "far": far, "seed": seed, "generate": generate,
        "recognizers": {name: r.description for name, r in recognizers.items()},
        "fid": fid.convention if fid is not None else "FID not computed (set eval.fid.weights to the Inception file)",
        "attributes": attribute_note,
        "reconstruction": ("PSNR/SSIM of the own-identity reconstruction vs the source (whole image, data range 2, "
                           "mean over faces)")
                          if reconstruction else None,
        "sampler_steps": OmegaConf.select(cfg, "model.sampler.params.num_inference_steps"),
        "precision": precision,
    }
    return metrics, meta


def _check_writable(folder: Path) -> None:
    """UserError if a file stands where ``folder`` or one of its parents must be a folder (nothing is made)."""
    from ..errors import UserError

    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"cannot write {folder}: {path} is a file, not a folder")
            return


def reconstruction_metrics():
    """(PSNR, SSIM) of [-1, 1] images, each face's value averaged over the faces, as papers report them
    (torchmetrics' default PSNR pools the squared error of all faces: one bad face sets the figure)."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    return (PeakSignalNoiseRatio(data_range=2.0, dim=(1, 2, 3)),
            StructuralSimilarityIndexMeasure(data_range=2.0))


def run(args: argparse.Namespace) -> int:
    from ..config import save_config, split_args
    from ..inference import module_for_checkpoint
    from ..metrics.table import save_metrics
    from ..training import split_path

    checkpoint = Path(args.checkpoint)
    files, overrides = split_args(args.args)
    overrides += [f"eval.limit={args.limit}"] if args.limit is not None else []
    cfg, state = _checkpoint_config(checkpoint, files, overrides)
    module, cfg, _ = module_for_checkpoint(cfg, state)
    module.load_state_dict(state)
    device = str(resolve_device(args.device))
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(checkpoint)
    _check_writable(run_dir)  # now, not after the evaluation
    metrics, meta = evaluate(module, cfg, reconstruction=not args.no_reconstruction,
                             device=device, split_file=split_path(cfg, training_run_dir(checkpoint)),
                             precision=args.precision)
    meta["checkpoint"] = str(checkpoint)
    save_config(cfg, run_dir / "eval_config.yaml")
    if not (run_dir / "config.yaml").exists():  # names the run's row in `id2face table`
        save_config(cfg, run_dir / "config.yaml")
    path = save_metrics(run_dir, metrics, meta)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"id2face eval: wrote {path}", file=sys.stderr)
    return 0
