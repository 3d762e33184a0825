"""The end-to-end demo: train, anonymize and evaluate on SynthFaces, then write a report.

Steps (each reuses its output if present, so a second run only rebuilds the report):
1. train the tiny identity encoder on the training identities (``id2face train-encoder``);
2. train the ID²Face model (``id2face train``) in ``runs/demo/id2face/seed0`` (4000 steps, ~30 min
   on 2 cores); or skip 1-2 and evaluate a checkpoint (``make demo``: the shipped one, which this
   very command trained, see README);
3. evaluate the test split (identities never seen in training) with the SynthFaces oracle, a
   judge trained apart from the model: once anonymizing, once reconstructing with the face's own
   identity (the baseline that shows what "identity kept" reads on the same metrics);
4. write ``runs/demo/report.md`` with the table and ``runs/demo/grid.png``
   (source | reconstruction | K anonymizations).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .config import load_config, save_config
from .metrics.table import save_metrics
from .training import final_checkpoint, fit, run_dir, split_path

COLUMNS = [  # (metrics key, label, better)
    ("oracle/top1", "oracle identity top-1", "↓"),
    ("oracle/top5", "oracle identity top-5", "↓"),
    ("id_factor_change", "identity-factor change", "↑"),
    ("pose", "pose error (deg)", "↓"),
    ("expression", "expression error", "↓"),
    ("fid", "FID (oracle features)", "↓"),
    ("oracle/diversity", "diversity", "↑"),
]


def _say(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_encoder(config_path: Path, output: Path, steps: int) -> None:
    if output.is_file():
        _say(f"identity encoder: reusing {output}")
        return
    from .commands import train_encoder as command

    _say(f"identity encoder: training the tiny encoder ({steps} steps)")
    args = argparse.Namespace(args=[str(config_path), "model.identity_encoder.params.weights=null"], output=str(output), steps=steps, batch_size=128, lr=3e-3,
                              margin=0.2, scale=16.0, device="cpu")
    command.run(args)


def load_module(cfg, state):
    from .inference import module_for_checkpoint

    module = module_for_checkpoint(cfg, state)[0]
    module.load_state_dict(state)
    return module


def evaluate_both(cfg, module, folder: Path) -> dict[str, dict]:
    from .commands.eval import evaluate

    results = {}
    for generate in ("reconstruct", "anonymize"):
        _say(f"evaluating the test split ({generate})")
        metrics, meta = evaluate(module, cfg, reconstruction=False,
                                 progress=False, generate=generate, split_file=split_path(cfg, folder))
        target = folder if generate == "anonymize" else folder.parent / "reconstruction" / folder.name
        if generate == "reconstruct":
            save_config(cfg, target / "config.yaml")
        save_metrics(target, metrics, meta)
        results[generate] = {"metrics": metrics, "meta": meta}
    return results


def save_grid(module, cfg, path: Path, folder: Path, rows: int = 8, k: int = 4) -> None:
    from torchvision.utils import save_image

    from .data.datamodule import FacePairDataModule

    datamodule = FacePairDataModule(cfg.data, split_file=split_path(cfg, folder))
    datamodule.setup("test")
    dataset = datamodule.test_dataset
    step = max(1, len(dataset) // rows)
    items = [dataset[i * step] for i in range(rows)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"] for it in items])
    with torch.no_grad(), module.ema_weights():
        module.eval()
        columns = [images, module.model.reconstruct(images, masks, generator=torch.Generator().manual_seed(0))]
        columns += [module.model.anonymize(images, masks, generator=torch.Generator().manual_seed(1 + j))
                    for j in range(k)]
    grid = torch.stack(columns, 1).flatten(0, 1)  # rows = faces, columns = source | recon | anonymized x k
    save_image((grid + 1) / 2, path, nrow=len(columns), padding=1)


def write_report(path: Path, results: dict, cfg, seconds: dict, checkpoint: str | None = None) -> str:
    recon, anon = results["reconstruct"]["metrics"], results["anonymize"]["metrics"]
    meta = results["anonymize"]["meta"]
    lines = ["# id2face demo: SynthFaces", "",
             f"Test split: {meta['num_faces']} faces of identities never seen in training. "
             f"Judge: {meta['recognizers']['oracle']}. Attributes: {meta['attributes']}. {meta['fid']}.", "",
             "| run | " + " | ".join(f"{label} {arrow}" for _, label, arrow in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for name, m in (("reconstruction (own identity, baseline)", recon), ("ID²Face anonymization (OIM)", anon)):
        cells = [f"{m[key]:.3f}" if key in m else "–" for key, _, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Chance top-1 on the full test split is 1/(test identities) = {1 / _test_identities(cfg):.3f}.",
              "", "![source | reconstruction | anonymized x4](grid.png)", "",
              "Columns of grid.png: source, reconstruction with the own identity, four anonymizations.", "",
              "Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
              (f"Model: `{checkpoint}`, produced by `id2face train` (see README)." if checkpoint else
               f"Model: trained here for {cfg.trainer.max_steps} steps: `{run_dir(cfg)}/checkpoints/last.ckpt`."),
              "", "Reproduce: `make demo` (or `id2face demo [--checkpoint CKPT]`).", ""]
    text = "\n".join(lines)
    path.write_text(text)
    return text


def _test_identities(cfg) -> int:
    fractions = list(cfg.data.split_fractions)
    return max(1, round(int(cfg.data.dataset.params.num_identities) * fractions[2]))


def judge_with(cfg, oracle: str) -> None:
    """Make ``oracle`` (a trained oracle's folder or file) the demo's judge, in place of the one the
    config trains into the cache; checked against the test data before any training starts."""
    from .metrics.oracle import check_fits, load_oracle
    from .registry import recognizer_nodes

    check_fits(load_oracle(oracle).config, cfg.data, oracle)
    others = [n for n in recognizer_nodes(cfg.eval)
              if n != "oracle" and not (isinstance(n, dict) and n.get("name") == "oracle")]
    cfg.eval.recognizers = [{"name": "oracle", "params": {"path": str(oracle)}}, *others]


def run_demo(root: str = "runs", overrides: list[str] = (), limit: int | None = None,
             checkpoint: str | None = None, oracle: str | None = None) -> Path:
    """``checkpoint``: evaluate a model that ``id2face train`` produced (its config comes with it)
    instead of training one here (steps 1-2). ``oracle``: judge with this trained oracle (``make demo``:
    the shipped one) instead of training one into the cache, whose weights would depend on the
    processor's float kernels."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    overrides = [*overrides, *([f"eval.limit={limit}"] if limit is not None else [])]
    out = Path(root) / "demo"
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint:
        from .inference import read_checkpoint_config

        saved, state, _ = read_checkpoint_config(checkpoint)
        cfg = load_config([], [f"run.root={root}", "model.identity_encoder.params.weights=null", *overrides],
                          base=saved, base_source=f"{checkpoint}'s config")
        if oracle:
            judge_with(cfg, oracle)
        folder = run_dir(cfg)
        save_config(cfg, folder / "config.yaml")
        trained = torch.load(checkpoint, map_location="cpu", weights_only=False).get("global_step")
        _say(f"model: evaluating {checkpoint} ({trained} training steps; no training here)")
    else:
        cfg = load_config(["tiny", "demo"], [f"run.root={root}",
                                              f"model.identity_encoder.params.weights={root}/demo/encoder.pt",
                                              *overrides])
        if oracle:
            judge_with(cfg, oracle)
        cfg_path = save_config(cfg, out / "demo_config.yaml")  # train-encoder reads the same resolved config
        t = time.perf_counter()
        train_encoder(cfg_path, Path(cfg.model.identity_encoder.params.weights), steps=400)
        seconds["encoder"] = time.perf_counter() - t

        t = time.perf_counter()
        folder = run_dir(cfg)
        state_file = folder / "train_state.json"
        if state_file.is_file() and json.loads(state_file.read_text()).get("status") == "finished":
            _say(f"model: reusing {folder}")
        else:
            _say(f"model: training {cfg.trainer.max_steps} steps in {folder}")
            fit(cfg)
        seconds["train"] = time.perf_counter() - t
        state = torch.load(final_checkpoint(folder), map_location="cpu", weights_only=False)["state_dict"]

    t = time.perf_counter()
    module = load_module(cfg, state)
    results = evaluate_both(cfg, module, folder)
    seconds["evaluate"] = time.perf_counter() - t
    save_grid(module, cfg, out / "grid.png", folder)
    seconds["total"] = time.perf_counter() - started
    report = write_report(out / "report.md", results, cfg, seconds, checkpoint)
    print(report)
    _say(f"wrote {out / 'report.md'} and {out / 'grid.png'} in {seconds['total']:.0f} s")
    return out
