"""The demo as `make demo` runs it: the shipped checkpoint judged by the shipped oracle, the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "demo-tiny.pt"
SHIPPED_ORACLE = REPO / "checkpoints" / "demo-oracle.pt"


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
    with pytest.raises(UserError, match="is a folder: name the weights file"):
        export_weights(out, tmp_path)
    assert not list(tmp_path.glob("*.partial"))
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read as a checkpoint"):
        export_weights(bad, tmp_path / "x.pt")
    assert bad.read_text() == "not a checkpoint"
    with pytest.raises(UserError, match="is a folder: name the checkpoint file"):
        read_checkpoint_config(tmp_path)


def test_the_shipped_oracle_is_the_judge_the_demo_config_would_train():
    """checkpoints/demo-oracle.pt is `id2face train-oracle tiny demo oracle.steps=600
    oracle.samples_per_identity=12` (README): the config the demo's recognizer node names, for the
    people the shipped model's test split renders."""
    from id2face.config import load_config
    from id2face.inference import read_checkpoint_config
    from id2face.metrics.oracle import check_fits, load_oracle, oracle_config

    demo = load_config(["tiny", "demo"])
    node = next(n for n in demo.eval.recognizers if n.name == "oracle")
    shipped = load_oracle(SHIPPED_ORACLE)
    assert shipped.config == oracle_config(demo.data, node.params.settings)
    model_data = read_checkpoint_config(SHIPPED)[0].data
    check_fits(shipped.config, model_data, SHIPPED_ORACLE)
    assert oracle_config(model_data, node.params.settings) == shipped.config
    assert "300 identities" in shipped.summary


def test_demo_refuses_an_oracle_that_does_not_judge_its_people_before_any_work(tmp_path, capsys):
    from id2face.cli import main
    from id2face.metrics.oracle import OracleConfig, oracle_dir, train_oracle

    small = OracleConfig(num_identities=4, samples_per_identity=2, steps=2, batch_size=8, width=4, embed_dim=8)
    train_oracle(small, tmp_path / "cache", log=lambda m: None)
    for oracle, message in ((oracle_dir(small, tmp_path / "cache"), "num_identities 4 (the data renders 300)"),
                            (tmp_path / "missing.pt", str(tmp_path / "missing.pt"))):
        code = main(["demo", "--checkpoint", str(SHIPPED), "--oracle", str(oracle), "--root", str(tmp_path / "runs")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "runs" / "demo" / "id2face").exists()  # refused before the model loads


@pytest.mark.slow
def test_make_demo_shows_anonymization_in_numbers(tmp_path):
    """`make demo`: the shipped checkpoint judged by the shipped oracle (nothing trained, nothing
    cached): the oracle re-identifies reconstructions far more often than anonymizations, while pose
    and expression errors stay at the reconstruction's level."""
    # conftest's OMP_NUM_THREADS=1 would make the sampling ~1.8x slower than `make demo` on 2 cores
    env = {**os.environ, "ID2FACE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-m", "id2face.cli", "demo", "--checkpoint", str(SHIPPED), "--oracle",
                           str(SHIPPED_ORACLE), "--root", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "cache").exists() and "oracle: rendering" not in done.stderr
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
