"""A tiny sweep through a real SLURM cluster (`make test` starts a one-node one with
scripts/slurm_local.sh): every array task trains, evaluates and leaves its run folder."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def slurm_ready() -> str | None:
    """None if a SLURM node is idle here, else the reason it is not."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "SLURM is not installed (make test runs scripts/slurm_local.sh start, which needs root + apt)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    if not any(s in states for s in ("idle", "mix")):
        return f"no idle SLURM node (sinfo: {states.strip() or 'no answer'}); start one with scripts/slurm_local.sh start"
    return None


@pytest.mark.slow
def test_sweep_runs_as_a_slurm_array_and_every_task_leaves_metrics(tmp_path):
    reason = slurm_ready()
    if reason:
        pytest.skip(reason)
    sweep = tmp_path / "tiny.sweep.yaml"
    sweep.write_text(f"""
base: [tiny]
ablations:
  base: []
  harmonizer_sum: [{REPO}/ablations/harmonizer_sum.yaml]
seeds: [0]
overrides:
  - run.root={tmp_path}/runs
  - trainer.max_steps=2
  - data.batch_size=2
  - data.dataset.params.num_identities=40
  - data.dataset.params.samples_per_identity=4
  - trainer.limit_val_batches=0
  - eval.limit=8
  - eval.diversity_k=2
  - "eval.recognizers=[{{name: encoder, params: {{encoder: {{name: tiny}}}}}}]"
resources: {{gpus_per_node: 0, cpus_per_task: 1, mem_gb: 4, timeout_min: 20}}
""")
    out = subprocess.run([sys.executable, "-m", "id2face.cli", "sweep", str(sweep), "--launcher", "slurm", "--wait",
                          "--folder", str(tmp_path / "slurm")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=900)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((tmp_path / "slurm").rglob("*.err")))
    assert out.returncode == 0, out.stderr[-3000:] + logs
    assert "submitted array job" in out.stderr
    for ablation in ("base", "harmonizer_sum"):
        folder = tmp_path / "runs" / "tiny" / ablation / "seed0"
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((folder / "train_state.json").read_text())["global_step"] == 2
        metrics = json.loads((folder / "metrics.json").read_text())["metrics"]
        assert 0.0 <= metrics["tiny/top1"] <= 1.0 and "pose" in metrics
    # the array really ran under SLURM: its tasks wrote submitit logs with SLURM job ids
    assert len(list((tmp_path / "slurm").glob("*_0"))) == 1 and len(list((tmp_path / "slurm").glob("*_1"))) == 1
