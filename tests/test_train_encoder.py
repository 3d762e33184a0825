"""`id2face train-encoder`: the tiny identity encoder learns SynthFaces identities it generalises to
held-out people, and the file it writes loads through the registry and reproduces its figures."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from id2face.cli import main
from id2face.commands.train_encoder import embed_all, heldout_items, load_images, retrieval_top1
from id2face.config import load_config
from id2face.data.pairs import split_identities
from id2face.registry import DATASETS, IDENTITY_ENCODERS

# 32 px SynthFaces: 160 training identities, 40 held out (chance 1/40). 600 steps of 64 took ~52 s of
# CPU (one thread) and reached top-1 0.275.
TRAIN_ARGS = ["tiny", "data.dataset.params.num_identities=200", "data.dataset.params.samples_per_identity=8"]


def test_retrieval_top1_on_known_embeddings():
    labels = torch.tensor([7, 7, 7, 3, 3, 9, 9])
    directions = {7: [1.0, 0.0, 0.0], 3: [0.0, 1.0, 0.0], 9: [0.0, 0.0, 1.0]}
    perfect = F.normalize(torch.tensor([directions[int(i)] for i in labels]) + 0.05, dim=-1)
    assert retrieval_top1(perfect, labels) == (1.0, 3)
    # queries of 7 look like 3: two of the four queries miss
    confused = perfect.clone()
    confused[1:3] = perfect[3]
    assert retrieval_top1(confused, labels) == (0.5, 3)


def test_heldout_items_are_val_and_test_identities_only():
    labels = np.repeat(np.arange(50), 4)
    split = split_identities(labels, (0.8, 0.1, 0.1), seed=0)
    index = heldout_items(labels, split)
    assert set(labels[index]) == set(labels[np.concatenate([split.val, split.test])])
    assert not set(labels[index]) & set(labels[split.train])
    assert len(index) == 10 * 4


@pytest.mark.parametrize("overrides, options, message", [
    ([], ["--steps", "0"], "--steps must be >= 1"),
    (["data.dataset.params.num_identities=4"], [], "held-out"),
    (["model.identity_encoder.params.widht=3"], [], "no parameter 'widht'"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, overrides, options, message):
    rc = main(["train-encoder", "tiny", *overrides, "-o", str(tmp_path / "w.pt"), "--steps", "1", *options])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.pt").exists()


def test_output_directory_is_refused(tmp_path, capsys):
    assert main(["train-encoder", "tiny", "-o", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_train_encoder_generalises_to_heldout_identities_and_reloads(tmp_path, capsys):
    weights = tmp_path / "tiny_encoder.pt"
    rc = main(["train-encoder", *TRAIN_ARGS, "-o", str(weights), "--steps", "600", "--batch-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and weights.is_file()
    found = re.search(r"held-out identity retrieval top-1: ([0-9.]+) \((\d+) identities not seen in training, "
                      r"chance ([0-9.]+)\)", out)
    assert found, out
    top1, identities, chance = float(found[1]), int(found[2]), float(found[3])
    before = float(re.search(r"before training: ([0-9.]+)", out)[1])
    assert identities == 40 and chance == pytest.approx(1 / 40, abs=1e-3)
    assert top1 > 6 * chance and top1 > before + 0.1, out

    # the file loads through the registry, as a config names it, and reproduces the figure
    cfg = load_config(TRAIN_ARGS[:1], [*TRAIN_ARGS[1:], f"model.identity_encoder.params.weights={weights}"])
    encoder = IDENTITY_ENCODERS.build(cfg.model.identity_encoder)
    saved = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in encoder.state_dict().items())
    assert saved["encoder"] == {"name": "tiny", "params": {}}
    dataset = DATASETS.build(cfg.data.dataset, image_size=cfg.data.image_size)
    labels = np.asarray(dataset.identity_labels)
    index = heldout_items(labels, split_identities(labels, cfg.data.split_fractions, cfg.data.split_seed))
    images = load_images(dataset, index)
    embeddings = embed_all(encoder, images, "cpu")
    reloaded_top1, _ = retrieval_top1(embeddings, labels[index])
    assert reloaded_top1 == saved["heldout_top1"] and f"{reloaded_top1:.3f}" == found[1]
    torch.testing.assert_close(embeddings, embed_all(encoder, images, "cpu"))
