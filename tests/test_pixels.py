"""``data.pixel_transport``: pair batches whose images and masks cross the loader as uint8."""
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from PIL import Image

from id2face.config import load_config
from id2face.data.datamodule import FacePairDataModule
from id2face.data.pixels import unpack_pixels
from id2face.errors import UserError
from id2face.training import fit

SIZE = 40


def photo_folder(root: Path, people: int = 6, shots: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for person in range(people):
        for shot in range(shots):
            path = root / f"p{person}" / f"{shot}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (SIZE + 8, SIZE, 3), dtype=np.uint8)).save(path)
    return root


def first_train_batch(data_cfg: dict, transport: str, workers: int = 0) -> dict:
    module = FacePairDataModule({**data_cfg, "pixel_transport": transport, "num_workers": workers})
    return next(iter(module.train_dataloader()))


def test_uint8_transport_carries_eight_bit_photos_bit_for_bit_in_a_quarter_of_the_bytes(tmp_path):
    data_cfg = {"dataset": {"name": "identity_folder", "params": {"root": str(photo_folder(tmp_path))}},
                "image_size": SIZE, "batch_size": 4}
    as_float = first_train_batch(data_cfg, "float32")
    as_bytes = first_train_batch(data_cfg, "uint8", workers=1)  # quantised in the worker process
    for side in "ab":
        packed, expected = as_bytes[side], as_float[side]
        assert packed["image"].dtype == packed["mask"].dtype == torch.uint8
        assert packed["image"].nbytes * 4 == expected["image"].nbytes
        assert packed["mask"].nbytes * 4 == expected["mask"].nbytes
        unpacked = unpack_pixels(as_bytes)[side]
        assert unpacked["image"].dtype == unpacked["mask"].dtype == torch.float32
        assert torch.equal(unpacked["image"], expected["image"])  # the photos' 8-bit levels, exactly
        assert torch.equal(unpacked["mask"], expected["mask"])
        assert torch.equal(packed["identity"], expected["identity"])
        assert torch.equal(packed["landmarks"], expected["landmarks"])
    passed = unpack_pixels(as_float)  # float batches pass through: the same tensors
    assert all(passed[side][key] is as_float[side][key] for side in "ab" for key in as_float[side])


def test_uint8_transport_rounds_rendered_pixels_to_the_nearest_level():
    data_cfg = dict(load_config(["tiny"], ["data.dataset.params.num_identities=16"]).data)
    as_float = first_train_batch(data_cfg, "float32")
    unpacked = unpack_pixels(first_train_batch(data_cfg, "uint8"))
    for side in "ab":
        error = (unpacked[side]["image"] - as_float[side]["image"]).abs().max().item()
        assert 0 < error <= 0.5 / 127.5 + 1e-6  # SynthFaces renders in float: half a level at most
        assert torch.equal(unpacked[side]["mask"], as_float[side]["mask"])


def test_an_unknown_pixel_transport_is_a_user_error():
    data_cfg = dict(load_config(["tiny"]).data)
    with pytest.raises(UserError, match="data.pixel_transport must be one of float32, uint8, got 'fp16'"):
        FacePairDataModule({**data_cfg, "pixel_transport": "fp16"})


class RecordBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record("train", batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.record("val", batch)

    def record(self, stage, batch):
        self.seen.append((stage, {side: (batch[side]["image"].dtype, batch[side]["image"].min().item(),
                                         batch[side]["image"].max().item(), set(batch[side]["mask"].unique().tolist()))
                                  for side in "ab"}))


def test_training_and_validation_steps_and_logged_images_see_float_pixels_from_a_uint8_loader(tmp_path):
    cfg = load_config(["tiny"], [f"run.root={tmp_path}", "data.pixel_transport=uint8", "trainer.max_steps=2",
                                 "data.batch_size=2", "data.dataset.params.num_identities=16",
                                 "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                                 "trainer.num_sanity_val_steps=0", "run.log_images_every_n_steps=1"])
    recorder = RecordBatches()
    folder = fit(cfg, callbacks=[recorder])
    assert [stage for stage, _ in recorder.seen] == ["train", "train", "val"]
    for _, sides in recorder.seen:
        for dtype, low, high, mask_values in sides.values():
            assert dtype == torch.float32 and -1.0 <= low < high <= 1.0 and mask_values == {0.0, 1.0}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tb"), size_guidance={"images": 0}).Reload()
    assert {"images/source", "images/anonymized"} <= set(events.Tags()["images"])
