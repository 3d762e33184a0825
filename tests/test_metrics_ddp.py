"""2-process CPU DDP (gloo): every metric computed on sharded data equals the single-process result.

DDP runs in a standalone script through subprocess (see ENVIRONMENT.md: a DDP launcher inside
pytest would re-run the pytest session on rank 1).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_metrics_script.py")


def _script_module():
    spec = importlib.util.spec_from_file_location("ddp_metrics_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_metrics_under_two_process_gloo_ddp_equal_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2

    script = _script_module()
    single = script.compute_metrics(None)
    shard_only = script.compute_metrics(0)  # no process group here: rank 0's shard alone
    assert shard_only["retrieval/top1"] != single["retrieval/top1"]  # the shards alone give other numbers

    for rank in ranks:
        for key, expected in single.items():
            exact = key.startswith(("retrieval", "verification/rate", "verification/far", "verification/tar"))
            if exact:
                assert rank[key] == expected, key
            elif math.isnan(expected):
                assert math.isnan(rank[key]), key
            else:
                assert rank[key] == pytest.approx(expected, rel=1e-5, abs=1e-6), key
