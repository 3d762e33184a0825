"""Identity-disjoint splits (reproducible, saved/checked), same-identity pairs with the one-image
rule, and the pair datamodule (batch shapes, split file, per-epoch partners through Lightning)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from id2face.config import load_config
from id2face.data.pairs import (LabelledSubset, PairDataset, Split, augmented_view, load_or_create_split,
                                split_identities)
from id2face.data.synthfaces import SynthFaces
from id2face.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class LabelledIndices(torch.utils.data.Dataset):
    """Items that only carry their own index and label (fast, for pair-selection tests)."""

    def __init__(self, labels):
        self.identity_labels = np.asarray(labels, dtype=np.int64)

    def __len__(self):
        return len(self.identity_labels)

    def __getitem__(self, i):
        size = 8
        image = torch.full((3, size, size), -1.0)
        return {"image": image, "mask": torch.zeros(1, size, size), "landmarks": torch.full((5, 2), 4.0),
                "identity": int(self.identity_labels[i]), "index": i}


def _labels(num_identities=50, per_identity=4):
    return np.repeat(np.arange(num_identities), per_identity)


def test_split_is_identity_disjoint_complete_and_sized_by_fractions():
    labels = _labels(100, 3)
    split = split_identities(labels, (0.8, 0.1, 0.1), seed=0)
    ids = {name: set(labels[split[name]].tolist()) for name in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert [len(ids[n]) for n in ("train", "val", "test")] == [80, 10, 10]
    every = np.concatenate([split.train, split.val, split.test])
    assert sorted(every.tolist()) == list(range(len(labels)))  # each item exactly once
    assert split.by_identity


def test_split_reproducible_by_seed():
    labels = _labels(40, 2)
    a, b, c = (split_identities(labels, (0.5, 0.25, 0.25), seed=s) for s in (3, 3, 4))
    assert all(np.array_equal(a[n], b[n]) for n in ("train", "val", "test"))
    assert not np.array_equal(a.test, c.test)


def test_unlabelled_items_go_to_train_and_unlabelled_datasets_split_by_item():
    labels = np.concatenate([_labels(20, 2), np.full(7, -1)])
    split = split_identities(labels, (0.6, 0.2, 0.2), seed=1)
    unlabelled = set(np.flatnonzero(labels == -1).tolist())
    assert unlabelled <= set(split.train.tolist())
    assert not unlabelled & (set(split.val.tolist()) | set(split.test.tolist()))
    ffhq_like = split_identities(np.full(50, -1), (0.8, 0.1, 0.1), seed=0)
    assert not ffhq_like.by_identity and [len(ffhq_like[n]) for n in ("train", "val", "test")] == [40, 5, 5]


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1), ("a", "b", "c"), 1.0,
                                       [[0.8], [0.1], [0.1]]])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(UserError, match="split_fractions"):
        split_identities(_labels(), fractions)


def test_split_file_round_trip_reuse_and_mismatch(tmp_path):
    labels = _labels(30, 2)
    path = tmp_path / "runs" / "split.json"
    made = load_or_create_split(labels, (0.8, 0.1, 0.1), seed=2, path=path)
    assert path.is_file() and json.loads(path.read_text())["format"] == "id2face-split/1"
    loaded = Split.load(path)
    assert all(np.array_equal(made[n], loaded[n]) for n in ("train", "val", "test"))
    # the file wins over a fresh computation: edit it and it is what comes back
    data = json.loads(path.read_text())
    data["val"], data["test"] = data["test"], data["val"]
    path.write_text(json.dumps(data))
    assert np.array_equal(load_or_create_split(labels, (0.8, 0.1, 0.1), 2, path).val, made.test)
    with pytest.raises(UserError, match="another dataset"):
        load_or_create_split(_labels(31, 2), (0.8, 0.1, 0.1), 2, path)
    with pytest.raises(UserError, match="split_seed 2"):
        load_or_create_split(labels, (0.8, 0.1, 0.1), 3, path)
    with pytest.raises(UserError, match="split_fractions"):
        load_or_create_split(labels, (0.7, 0.2, 0.1), 2, path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot be read"):
        load_or_create_split(labels, (0.8, 0.1, 0.1), 2, path)


def test_pairs_share_identity_stay_in_subset_and_are_deterministic_per_epoch():
    base = LabelledIndices(_labels(30, 4))
    subset = np.arange(0, 120, 1)[::2]  # two images per identity in the subset
    pairs = PairDataset(base, subset, seed=5)
    first = [pairs[i] for i in range(len(pairs))]
    for item in first:
        assert item["a"]["identity"] == item["b"]["identity"]
        assert item["b"]["index"] != item["a"]["index"] and item["b"]["index"] in set(subset.tolist())
    again = PairDataset(base, subset, seed=5)
    assert [again[i]["b"]["index"] for i in range(len(again))] == [p["b"]["index"] for p in first]

    wide = PairDataset(base, None, seed=5)  # four images per identity: partners change with the epoch
    epoch0 = [wide[i]["b"]["index"] for i in range(len(wide))]
    wide.set_epoch(1)
    epoch1 = [wide[i]["b"]["index"] for i in range(len(wide))]
    assert sum(a != b for a, b in zip(epoch0, epoch1)) > len(wide) // 3
    wide.set_epoch(0)
    assert [wide[i]["b"]["index"] for i in range(len(wide))] == epoch0
    # over seeds, item 0's partner is spread over the 3 other images of identity 0, never itself
    counts = np.bincount([PairDataset(base, None, seed=s)[0]["b"]["index"] for s in range(60)], minlength=4)
    assert len(counts) == 4 and counts[0] == 0 and (counts[1:] > 8).all()


def test_one_image_rule_uses_an_augmented_view_of_the_same_image():
    ds = SynthFaces(32, num_identities=4, samples_per_identity=1, seed=0)
    pairs = PairDataset(ds, None, seed=0)
    item = pairs[2]
    a, b = item["a"], item["b"]
    assert a["identity"] == b["identity"] == 2
    assert b["image"].shape == a["image"].shape and b["mask"].shape == a["mask"].shape
    assert not torch.equal(a["image"], b["image"])
    assert torch.corrcoef(torch.stack([a["image"].flatten(), b["image"].flatten()]))[0, 1] > 0.7
    # unlabelled items (FFHQ-like) follow the same rule even when many share the label -1
    unlabelled = PairDataset(LabelledIndices(np.full(6, -1)), None, seed=0)
    assert all(unlabelled[i]["b"]["index"] == i for i in range(6))


def test_augmented_view_moves_image_mask_and_landmarks_together():
    size = 64
    image = torch.full((3, size, size), -1.0)
    mask = torch.zeros(1, size, size)
    points = torch.tensor([[20.5, 24.5], [44.5, 24.5], [32.5, 36.5], [24.5, 46.5], [40.5, 46.5]])
    for x, y in points.long():
        image[:, y - 1:y + 2, x - 1:x + 2] = 1.0
        mask[:, y - 2:y + 3, x - 2:x + 3] = 1.0
    item = {"image": image, "mask": mask, "landmarks": points, "identity": 3}
    for seed in range(5):
        out = augmented_view(item, np.random.default_rng(seed), max_shift=0.08)
        assert out["identity"] == 3 and set(out["mask"].unique().tolist()) <= {0.0, 1.0}
        assert not torch.allclose(out["landmarks"], points)
        bright = out["image"].mean(0)
        for x, y in out["landmarks"]:
            xi, yi = int(x), int(y)
            window = bright[yi - 3:yi + 4, xi - 3:xi + 4]
            ys, xs = torch.meshgrid(torch.arange(yi - 3, yi + 4) + 0.5, torch.arange(xi - 3, xi + 4) + 0.5,
                                    indexing="ij")
            weight = (window - window.min()).clamp(min=0)
            centroid = torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
            assert torch.allclose(centroid, torch.stack([x, y]), atol=0.6), (seed, centroid, x, y)
            assert out["mask"][0, yi, xi] == 1


def _tiny_data_cfg(**overrides):
    cfg = load_config(["tiny"], [f"data.{k}={v}" for k, v in overrides.items()])
    return cfg.data


@pytest.mark.parametrize("fractions", ["1", "[a,b,c]", "[0.5,0.5,0.5]"])
def test_datamodule_refuses_bad_fractions_before_touching_the_data(fractions, tmp_path):
    from id2face.data.datamodule import FacePairDataModule

    with pytest.raises(UserError, match=r"^split_fractions must be three non-negative numbers"):
        FacePairDataModule(_tiny_data_cfg(split_fractions=fractions, split_file=str(tmp_path / "split.json")))
    assert not (tmp_path / "split.json").exists()


def test_datamodule_batches_splits_and_test_dataset(tmp_path):
    from id2face.data.datamodule import FacePairDataModule

    data_cfg = _tiny_data_cfg(**{"dataset.params.num_identities": 20, "dataset.params.samples_per_identity": 3,
                                 "batch_size": 4, "split_file": str(tmp_path / "split.json")})
    dm = FacePairDataModule(data_cfg)
    dm.setup("fit")
    assert (tmp_path / "split.json").is_file()
    assert [len(dm.split[n]) for n in ("train", "val", "test")] == [48, 6, 6]
    batch = next(iter(dm.train_dataloader()))
    for side in ("a", "b"):
        assert batch[side]["image"].shape == (4, 3, 32, 32)
        assert batch[side]["mask"].shape == (4, 1, 32, 32)
        assert batch[side]["landmarks"].shape == (4, 5, 2)
    assert torch.equal(batch["a"]["identity"], batch["b"]["identity"])
    assert not torch.equal(batch["a"]["image"], batch["b"]["image"])
    val = next(iter(dm.val_dataloader()))
    assert set(val["a"]["identity"].tolist()) <= set(dm.dataset.identity_labels[dm.split.val].tolist())
    assert len(dm.test_dataset) == 6 and isinstance(dm.test_dataset, LabelledSubset)
    assert dm.test_dataset[0]["image"].shape == (3, 32, 32)
    assert set(dm.test_dataset.identity_labels.tolist()).isdisjoint(dm.dataset.identity_labels[dm.split.train])
    # a second module with the same config reuses the saved split
    again = FacePairDataModule(data_cfg)
    again.setup("test")
    assert np.array_equal(again.split.test, dm.split.test)


@pytest.mark.parametrize("device, pinned", [("cuda", True), ("cpu", False)])
def test_loaders_pin_their_batches_when_the_trainer_runs_on_cuda(device, pinned):
    """A copy to the GPU from pageable memory waits for the GPU's queued work (the step would start on
    a drained queue); pinned batches go without waiting. No trainer, or one on the CPU: not pinned."""
    from types import SimpleNamespace

    from id2face.data.datamodule import FacePairDataModule

    dm = FacePairDataModule(_tiny_data_cfg(**{"dataset.params.num_identities": 8,
                                              "dataset.params.samples_per_identity": 2, "batch_size": 2}))
    assert not dm.train_dataloader().pin_memory
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert [loader.pin_memory for loader in loaders] == [pinned] * 3


def test_datamodule_redraws_partners_each_epoch_through_its_loader():
    import lightning as L

    from id2face.data.datamodule import FacePairDataModule

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.partners = {}

        def training_step(self, batch, batch_idx):
            key = (self.current_epoch, batch_idx)
            self.partners[key] = (batch["a"]["attr_factors"][:, 0] - batch["b"]["attr_factors"][:, 0]).tolist()
            return (self.weight * batch["a"]["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data_cfg = _tiny_data_cfg(**{"dataset.params.num_identities": 10, "dataset.params.samples_per_identity": 4,
                                 "batch_size": 40, "split_fractions": "[1.0,0.0,0.0]"})
    dm = FacePairDataModule(data_cfg)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(recorder, datamodule=dm)
    assert dm.train_pairs.epoch == 1
    # one batch holds all 40 pairs, so shuffling cannot explain a change: only re-drawn partners can
    first = sorted(round(x, 6) for x in recorder.partners[(0, 0)])
    second = sorted(round(x, 6) for x in recorder.partners[(1, 0)])
    assert first != second


@pytest.mark.slow
def test_datamodule_under_ddp_gives_each_rank_different_pairs(tmp_path):
    """Two CPU ranks (gloo): Lightning's DistributedSampler splits the training pairs."""
    script = tmp_path / "ddp_pairs.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys, torch, lightning as L
        from id2face.config import load_config
        from id2face.data.datamodule import FacePairDataModule

        class Seen(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.weight = torch.nn.Parameter(torch.zeros(1))
                self.seen = []
            def training_step(self, batch, batch_idx):
                assert torch.equal(batch["a"]["identity"], batch["b"]["identity"])
                self.seen += batch["a"]["attr_factors"][:, 0].tolist()
                return (self.weight * batch["a"]["image"].mean()).sum()
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        cfg = load_config(["tiny"], ["data.dataset.params.num_identities=8",
                                     "data.dataset.params.samples_per_identity=2", "data.batch_size=2",
                                     "data.split_fractions=[1.0,0.0,0.0]",
                                     "data.split_file={tmp_path / 'split.json'}"])
        model = Seen()
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(model, datamodule=FacePairDataModule(cfg.data))
        with open("{tmp_path}/rank%d.json" % trainer.global_rank, "w") as f:
            json.dump(model.seen, f)
    """))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 16


class _Numbers(torch.utils.data.Dataset):
    """0..n-1, remembering which items were read and the epoch it was told."""

    def __init__(self, n):
        self.n, self.read, self.epoch = n, [], None

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.read.append(i)
        return i

    def set_epoch(self, epoch):
        self.epoch = epoch


@pytest.mark.parametrize("workers", [0, 1])
def test_resumable_loader_continues_its_epoch_after_a_load(workers):
    """A new loader given the old one's state (as Lightning restores it) yields the rest of that
    epoch, reading none of the skipped items; another epoch is whole; same order in any process."""
    from id2face.data.datamodule import EpochShuffle, ResumableLoader

    def loader(data):
        return ResumableLoader(data, batch_size=3, sampler=EpochShuffle(data, seed=7), num_workers=workers)

    first_data = _Numbers(20)
    first = loader(first_data)
    first.sampler.set_epoch(2)
    whole = [b.tolist() for b in first]
    assert len(whole) == 7 and sorted(sum(whole, [])) == list(range(20))
    assert first.state_dict() == {"epoch": 2, "batches_done": 7}
    partial = iter(first)
    seen = [next(partial).tolist() for _ in range(3)]
    assert seen == whole[:3] and first.state_dict() == {"epoch": 2, "batches_done": 3}

    data = _Numbers(20)
    resumed = loader(data)
    resumed.load_state_dict(first.state_dict())
    resumed.sampler.set_epoch(2)
    assert [b.tolist() for b in resumed] == whole[3:]
    if workers == 0:
        assert sorted(data.read) == sorted(sum(whole[3:], []))  # the skipped items were never read
        assert data.epoch == 2
    assert resumed.state_dict() == {"epoch": 2, "batches_done": 7}
    assert [b.tolist() for b in resumed] == whole  # the skip is for one pass only

    other = loader(_Numbers(20))
    other.load_state_dict({"epoch": 2, "batches_done": 3})
    other.sampler.set_epoch(3)  # the checkpoint's epoch is over: nothing to skip
    third = [b.tolist() for b in other]
    assert len(third) == 7 and third != whole
