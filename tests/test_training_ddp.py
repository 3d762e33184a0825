import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_cpu_ddp_training_keeps_ranks_identical(tmp_path):
    out = tmp_path / "checksums.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_train_script.py"), str(tmp_path / "runs"), str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["global_step"] == 3
    rank0, rank1 = result["checksums"]
    assert rank0 == rank1  # bit-identical parameters after 3 synchronised steps
    assert result["start"][0] == result["start"][1]  # DDP broadcast rank 0's initial weights
    assert rank0 != result["start"][0]  # and the 3 steps did train
