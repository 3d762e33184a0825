"""Sampling precision outside the Trainer: names, defaults per device, and the autocast it gives."""
import pytest
import torch

from id2face.errors import UserError
from id2face.precision import INFERENCE_PRECISIONS, autocast, resolve_precision


@pytest.mark.parametrize("trained,expected", [("bf16-mixed", "bf16-mixed"), ("bf16-true", "bf16-mixed"),
                                              ("16-mixed", "16-mixed"), (32, "32-true"), ("32-true", "32-true"),
                                              (None, "32-true"), ("transformer-engine", "32-true")])
def test_auto_follows_the_training_precision_on_cuda_and_is_fp32_on_cpu(trained, expected):
    assert resolve_precision("auto", torch.device("cuda"), trained) == expected
    assert resolve_precision(None, "cuda:1", trained) == expected
    assert resolve_precision("auto", "cpu", trained) == "32-true"


def test_an_explicit_precision_wins_and_an_unknown_one_is_refused():
    assert resolve_precision("bf16-mixed", "cpu", "32-true") == "bf16-mixed"
    assert resolve_precision("32-true", "cuda", "bf16-mixed") == "32-true"
    with pytest.raises(UserError, match="valid: auto, 32-true, bf16-mixed, 16-mixed"):
        resolve_precision("bf16-true", "cpu", None)


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16),
                                             ("16-mixed", torch.float16)])
def test_autocast_gives_the_precision_s_matmul_dtype(precision, dtype):
    assert precision in INFERENCE_PRECISIONS
    x = torch.randn(4, 8)
    with autocast(precision, "cpu"):
        assert (x @ x.T).dtype == dtype
    assert (x @ x.T).dtype == torch.float32
