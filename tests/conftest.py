"""Shared test set-up: offline hubs, GPU tests skipped without CUDA, small deterministic runs."""
from __future__ import annotations

import os

# Before any hub-aware library is imported: a hub id must fail in 0.2 s, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one intra-op thread beats two spinning ones (40 tiny training steps on a loaded
# 2-core machine: 15 s vs 117 s). Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not any("gpu" in item.keywords for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _diffusers_logs_to_the_sessions_stderr():
    """diffusers adds its log handler on first use, on that moment's sys.stderr: under a test's
    capsys, a stream closed after the test, so each later diffusers warning wrote a "Logging error"
    traceback into whatever test captured stderr next (its one-line error checks then failed: seen
    with the benchmark tests run before test_anonymize). Made here, on the session's stderr."""
    from diffusers.utils import logging

    logging.get_logger("diffusers")


@pytest.fixture(autouse=True)
def _restore_inductor_cache_dir():
    """`id2face.training.fit` points torch.compile's cache at the run root (a tmp dir in tests):
    no test's setting may outlive it."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture
def fresh_dynamo():
    """torch.compile state of no earlier test: a second model through the same compiled code object
    (e.g. UNet2DConditionModel.forward with other shapes) makes dynamo recompile it with dynamic
    shapes, which took a tiny training run's compile from 90 s to 240 s in the full suite."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def group_photo():
    """(768, 1024, 3) uint8: four SynthFaces faces on coarse colour noise, which gives MTCNN's first
    stage hundreds of candidates (930): where per-candidate work shows."""
    import numpy as np
    from PIL import Image

    from id2face.data.synthfaces import render_sample

    noise = np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8)
    photo = np.asarray(Image.fromarray(noise).resize((1024, 768), Image.BICUBIC)).copy()
    for index in range(4):
        face = render_sample(index, 0, 128)["image"].permute(1, 2, 0).numpy()
        x = 40 + 180 * index
        photo[40:168, x:x + 128] = np.rint((face + 1) * 127.5)
    return photo
