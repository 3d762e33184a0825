"""`id2face train-encoder`: the tiny identity encoder learns SynthFaces identities it generalises to
held-out people, and the file it writes loads through the registry and reproduces its figures."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from id2face.cli import main
from id2face.commands import train_encoder
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
    ([], ["--batch-size", "1"], "--batch-size must be >= 2"),
    ([], ["--lr", "-1"], "--lr must be a finite number > 0 (got -1.0)"),
    ([], ["--lr", "nan"], "--lr must be a finite number > 0 (got nan)"),  # would train to NaN weights
    ([], ["--margin", "inf"], "--margin must be a finite number >= 0"),
    ([], ["--margin", "-0.2"], "--margin must be a finite number >= 0"),
    ([], ["--scale", "0"], "--scale must be a finite number > 0"),
    # checked before any work: before the config, which has a typo here
    (["model.identity_encoder.params.widht=3"], ["--lr", "nan"], "--lr must be"),
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


def test_safetensors_output_name_is_refused(tmp_path, capsys):
    # the timm encoder would read the torch.save file it names as safetensors, and fail
    assert main(["train-encoder", "tiny", "-o", str(tmp_path / "w.safetensors"), "--steps", "1"]) == 2
    assert "name it .pt" in capsys.readouterr().err and not (tmp_path / "w.safetensors").exists()


# Every registered identity encoder, untrained and as small as it builds offline.
ROUND_TRIP_NODES = {
    "tiny": {},
    "arcface": {"allow_random_init": "true", "depth": 18},
    "facenet": {"allow_random_init": "true"},
    "timm": {"model_name": "test_resnet", "embed_dim": 64},
}
ROUND_TRIP_DATA = ["data.dataset.params.num_identities=20", "data.dataset.params.samples_per_identity=4"]


def test_round_trip_covers_every_registered_identity_encoder():
    assert sorted(ROUND_TRIP_NODES) == sorted(IDENTITY_ENCODERS.names())


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_NODES))
def test_written_file_loads_as_the_encoders_weights_and_reproduces_the_trained_encoder(
        tmp_path, monkeypatch, capsys, name):
    trained = []

    def recording_train(encoder, *args, **kwargs):
        trained.append((encoder, {k: v.clone() for k, v in encoder.state_dict().items()}))
        return real_train(encoder, *args, **kwargs)

    real_train = train_encoder.train
    monkeypatch.setattr(train_encoder, "train", recording_train)
    node = [f"model.identity_encoder.name={name}",
            *(f"model.identity_encoder.params.{k}={v}" for k, v in ROUND_TRIP_NODES[name].items())]
    weights = tmp_path / "encoder.pt"
    rc = main(["train-encoder", "tiny", *node, *ROUND_TRIP_DATA, "-o", str(weights),
               "--steps", "2", "--batch-size", "4", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    ((encoder, initial),) = trained

    # built from the file as a config names it, strictly loaded (arcface/facenet/timm load into their inner net)
    cfg = load_config(["tiny"], [*node, f"model.identity_encoder.params.weights={weights}"])
    reloaded = IDENTITY_ENCODERS.build(cfg.model.identity_encoder)
    final = encoder.state_dict()
    assert any(not torch.equal(final[k], v) for k, v in initial.items())  # the two steps did train it
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), encoder(x), rtol=1e-5, atol=1e-6)
    # all of the trained encoder came back: nothing was trained outside the file (the timm projection
    # stays the one every build draws from its seed)
    assert reloaded.state_dict().keys() == encoder.state_dict().keys()
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in reloaded.state_dict().items())


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
