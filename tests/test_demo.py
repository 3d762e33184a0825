"""The demo as `make demo` runs it: the shipped checkpoint, a freshly trained oracle, the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "demo-tiny.pt"


def test_export_keeps_weights_and_config_and_drops_training_state(tmp_path):
    from id2face.inference import read_checkpoint_config
    from id2face.commands.export import export_weights
    from id2face.errors import UserError

    out = export_weights(SHIPPED, tmp_path / "copy.pt")
    original, copy = (torch.load(p, map_location="cpu", weights_only=False) for p in (SHIPPED, out))
    assert copy["global_step"] == original["global_step"] == 4000
    config, state, _ = read_checkpoint_config(out)
    assert config.model.scheduler.params.prediction_type == "sample"
    assert state.keys() == original["state_dict"].keys()
    assert all(torch.equal(state[k], original["state_dict"][k]) for k in state)
    assert not {"optimizer_states", "lr_schedulers", "loops", "callbacks"} & set(copy)
    with pytest.raises(UserError, match="checkpoint itself"):
        export_weights(out, out)
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        export_weights(bad, tmp_path / "x.pt")
    assert bad.read_text() == "not a checkpoint"
    with pytest.raises(UserError, match="is a folder: name the checkpoint file"):
        read_checkpoint_config(tmp_path)


@pytest.mark.slow
def test_make_demo_shows_anonymization_in_numbers(tmp_path):
    """`id2face demo --checkpoint checkpoints/demo-tiny.pt` with an empty oracle cache: the oracle
    re-identifies reconstructions far more often than anonymizations, while pose and expression
    errors stay at the reconstruction's level."""
    env = {**os.environ, "ID2FACE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "id2face.cli", "demo", "--checkpoint", str(SHIPPED),
                           "--root", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "demo" / "id2face"
    anon = json.loads((folder / "seed0" / "metrics.json").read_text())["metrics"]
    recon = json.loads((folder / "reconstruction" / "seed0" / "metrics.json").read_text())["metrics"]
    chance = 1 / 30
    assert recon["oracle/top1"] > 10 * chance
    assert anon["oracle/top1"] < 0.6 * recon["oracle/top1"]
    assert anon["oracle/diversity"] > 2 * recon["oracle/diversity"]
    assert anon["pose"] < 1.1 * recon["pose"] and anon["expression"] < 1.1 * recon["expression"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "| ID²Face anonymization (OIM) | " + f"{anon['oracle/top1']:.3f}" in report
    from PIL import Image

    grid = Image.open(tmp_path / "demo" / "grid.png")
    assert grid.size == (6 * 33 + 1, 8 * 33 + 1)  # 6 columns x 8 faces of 32 px, 1 px padding
