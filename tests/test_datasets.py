"""Real-face datasets on small fake trees laid out exactly like the published datasets."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from id2face.data.align import inner_face_mask, scale_points, template_landmarks, transform_points
from id2face.data.datasets import hflip_item
from id2face.errors import UserError
from id2face.registry import DATASETS

S = 32  # image_size of the items


def build(name: str, image_size: int = S, **params):
    return DATASETS.build({"name": name, "params": params}, image_size=image_size)


def colour(index: int) -> tuple[int, int, int]:
    """A distinct flat colour per file, so a test can tell which file an item came from."""
    return (40 + 37 * index % 200, 200 - 23 * index % 180, 60 + 51 * index % 190)


def write_image(path: Path, index: int, size=(24, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(index)).save(path, quality=100)


def item_colour(item) -> np.ndarray:
    return ((item["image"].mean(dim=(1, 2)) + 1) * 127.5).numpy()


def check_item(item, image_size: int = S) -> None:
    assert item["image"].shape == (3, image_size, image_size) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert item["mask"].shape == (1, image_size, image_size)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["landmarks"].shape == (5, 2) and item["landmarks"].dtype == torch.float32
    assert isinstance(item["identity"], int)


CELEBA_IDS = {"000001.jpg": 2880, "000002.jpg": 2880, "000003.jpg": 17, "000004.jpg": 17,
              "000005.jpg": 10177, "000006.jpg": 5}
CELEBA_PARTITION = {"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 1, "000004.jpg": 1, "000005.jpg": 2,
                    "000006.jpg": 2}


def make_celeba(root: Path, google_drive_layout: bool = False) -> None:
    images = root / ("Img/img_align_celeba" if google_drive_layout else "img_align_celeba")
    for index, name in enumerate(CELEBA_IDS):
        write_image(images / name, index, size=(178, 218))
    anno, evaluation = (root / "Anno", root / "Eval") if google_drive_layout else (root, root)
    anno.mkdir(parents=True, exist_ok=True)
    evaluation.mkdir(parents=True, exist_ok=True)
    (anno / "identity_CelebA.txt").write_text("".join(f"{n} {i}\n" for n, i in CELEBA_IDS.items()))
    (evaluation / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in CELEBA_PARTITION.items()))


@pytest.mark.parametrize("google_drive_layout", [False, True])
def test_celeba_raw_layout_identities_and_partition(tmp_path, google_drive_layout):
    make_celeba(tmp_path, google_drive_layout)
    data = build("celeba", root=str(tmp_path))
    assert not data.prepared and len(data) == 6
    assert data.identity_names == ["5", "17", "2880", "10177"]  # numeric order of CelebA's ids
    assert data.identity_labels.dtype == np.int64
    assert data.identity_labels.tolist() == [2, 2, 1, 1, 3, 0]
    for index in range(6):
        item = data[index]
        check_item(item)
        assert item["identity"] == data.identity_labels[index]
        assert np.abs(item_colour(item) - colour(index)).max() < 3
        np.testing.assert_allclose(item["landmarks"].numpy(), template_landmarks(S), atol=1e-4)
        assert torch.equal(item["mask"][0], torch.from_numpy(inner_face_mask(template_landmarks(S), S)))
    test = build("celeba", root=str(tmp_path), partition="test")
    assert len(test) == 2 and test.identity_names == ["5", "10177"]
    with pytest.raises(UserError, match="partition"):
        build("celeba", root=str(tmp_path), partition="holdout")


def test_celeba_shipped_landmarks_warp_images_onto_the_template(tmp_path):
    """With list_landmarks_align_celeba.txt, raw images are aligned by CelebA's own 5 points."""
    size = 64
    template = template_landmarks(size)
    # Put the face at a known similarity of the template inside a 178 x 218 CelebA-sized image.
    angle, scale = 0.2, 1.6
    matrix = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 30.0],
                       [scale * np.sin(angle), scale * np.cos(angle), 45.0]])
    points = transform_points(template, matrix)
    pixels = np.zeros((218, 178, 3), np.uint8)
    for x, y in np.rint(points[:2]).astype(int):  # bright eyes only
        pixels[y - 2:y + 3, x - 2:x + 3] = 255
    (tmp_path / "img_align_celeba").mkdir()
    Image.fromarray(pixels).save(tmp_path / "img_align_celeba/000001.png")
    (tmp_path / "identity_CelebA.txt").write_text("000001.png 1\n")
    coords = " ".join(str(int(v)) for v in np.rint(points).ravel())
    (tmp_path / "list_landmarks_align_celeba.txt").write_text(
        "1\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
        f"000001.png {coords}\n")
    item = build("celeba", image_size=size, root=str(tmp_path))[0]
    np.testing.assert_allclose(item["landmarks"].numpy(), template, atol=0.6)  # rounding of the file's ints
    gray = item["image"].mean(0).numpy()
    for x, y in np.rint(template[:2]).astype(int):
        assert gray[y, x] > 0.5  # the bright eye dots land on the template eyes
    assert gray[:8].max() < -0.9  # and nothing else is bright


def test_celebahq_identities_come_through_the_mapping_file(tmp_path):
    mapping = {0: (119613, "119614.jpg"), 1: (99094, "099095.jpg"), 2: (200118, "200119.jpg"),
               3: (81059, "081060.jpg")}
    for index in mapping:
        write_image(tmp_path / "CelebA-HQ-img" / f"{index}.jpg", index, size=(64, 64))
    write_image(tmp_path / "CelebA-HQ-img" / "7.jpg", 7, size=(64, 64))  # not in the mapping: unlabelled
    (tmp_path / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx    orig_file   \n" + "".join(f"{i:<12d}{o:<12d}{f}\n" for i, (o, f) in mapping.items()))
    (tmp_path / "identity_CelebA.txt").write_text(
        "000001.jpg 2880\n119614.jpg 7\n099095.jpg 7\n200119.jpg 12\n081060.jpg 3\n")
    data = build("celebahq", root=str(tmp_path))
    assert len(data) == 5 and data.identity_names == ["3", "7", "12"]
    assert data.identity_labels.tolist() == [1, 1, 2, 0, -1]
    assert np.abs(item_colour(data[2]) - colour(2)).max() < 3
    (tmp_path / "identity_CelebA.txt").unlink()
    with pytest.raises(UserError, match="identity_CelebA.txt"):
        build("celebahq", root=str(tmp_path))


def test_vggface2_identity_is_the_parent_folder_and_subsets_select(tmp_path):
    for index, rel in enumerate(["train/n000002/0001_01.jpg", "train/n000002/0002_01.jpg",
                                 "train/n000003/0001_01.jpg", "test/n000001/0001_01.jpg"]):
        write_image(tmp_path / rel, index)
    data = build("vggface2", root=str(tmp_path))
    assert data.identity_names == ["n000001", "n000002", "n000003"]
    assert data.identity_labels.tolist() == [0, 1, 1, 2]  # sorted paths: test/... first
    train = build("vggface2", root=str(tmp_path), subset="train")
    assert len(train) == 3 and train.identity_names == ["n000002", "n000003"]
    assert np.abs(item_colour(train[2]) - colour(2)).max() < 3
    with pytest.raises(UserError, match="no folder"):
        build("vggface2", root=str(tmp_path), subset="val")


@pytest.mark.parametrize("name, param, value", [
    ("vggface2", "subset", "../.."), ("vggface2", "subset", "train/../../elsewhere"), ("vggface2", "subset", "/"),
    ("celeba", "image_dir", ".."), ("celebahq", "image_dir", "../photos")])
def test_layout_folders_must_stay_inside_the_root(tmp_path, name, param, value):
    # Item paths are relative to the root and `prepare` writes each crop at OUTPUT/images/<path>:
    # a folder above the root gave "../../photos/x.jpg" items and crops written beside the photos.
    root, outside = tmp_path / "data/root", tmp_path / "photos"
    write_image(root / "train/n000001/0001_01.jpg", 0)
    write_image(outside / "n000009/0001_01.jpg", 1)
    write_image(tmp_path / "elsewhere/n000008/x.jpg", 2)
    (root / "identity_CelebA.txt").write_text("0001_01.jpg 1\n")
    (root / "CelebA-HQ-to-CelebA-mapping.txt").write_text("idx orig_idx orig_file\n")
    with pytest.raises(UserError, match=f"{param}=.*must be a folder inside the dataset root"):
        build(name, root=str(root), **{param: value})
    assert len(build("vggface2", root=str(root), subset="train/../train")) == 1  # normalized, inside


def test_identity_folder_uses_the_first_folder_and_leaves_loose_files_unlabelled(tmp_path):
    for index, rel in enumerate(["alice/a.png", "alice/holiday/b.jpg", "bob/c.jpeg", "loose.png"]):
        write_image(tmp_path / rel, index)
    (tmp_path / "alice/notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / ".hidden/x.png", 9)
    data = build("identity_folder", root=str(tmp_path))
    assert data.paths == ["alice/a.png", "alice/holiday/b.jpg", "bob/c.jpeg", "loose.png"]
    assert data.identity_names == ["alice", "bob"]
    assert data.identity_labels.tolist() == [0, 0, 1, -1]
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=4)))
    assert batch["image"].shape == (4, 3, S, S) and batch["identity"].tolist() == [0, 0, 1, -1]


def test_ffhq_is_unlabelled_and_skips_thumbnails(tmp_path):
    for index, rel in enumerate(["images1024x1024/00000/00000.png", "images1024x1024/00000/00001.png",
                                 "thumbnails128x128/00000/00000.png"]):
        write_image(tmp_path / rel, index, size=(40, 40))
    data = build("ffhq", root=str(tmp_path))
    assert len(data) == 2 and data.identity_labels.tolist() == [-1, -1] and data.identity_names == []
    check_item(data[1])
    assert data[1]["identity"] == -1


def test_bad_parameters_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        build("identity_folder", root=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="no parameter 'subset'"):
        build("identity_folder", root=str(tmp_path), subset="x")
    write_image(tmp_path / "loose.png", 0)
    with pytest.raises(UserError, match="no identity labels"):
        build("identity_folder", root=str(tmp_path))
    with pytest.raises(UserError, match="mask"):
        build("ffhq", root=str(tmp_path), mask="ellipse")
    with pytest.raises(UserError, match="img_align_celeba"):
        build("celeba", root=str(tmp_path))


def write_prepared(root: Path, size: int, dataset: str, rows: list[tuple[str, str | None, str]]) -> list[np.ndarray]:
    """A prepare output by hand: (source, identity, status) rows; returns the crop landmarks."""
    root.mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({"format": 1, "size": size, "face_scale": 1.0, "dataset": dataset}))
    rng = np.random.default_rng(0)
    entries, landmarks = [], []
    for index, (source, identity, status) in enumerate(rows):
        entry = {"source": source, "output": None, "status": status, "message": "", "identity": identity}
        if status in ("ok", "multiple_faces"):
            output = f"images/{Path(source).with_suffix('.png').as_posix()}"
            write_image(root / output, index, size=(size, size))
            crop_landmarks = template_landmarks(size) + rng.normal(0, 2, (5, 2))
            landmarks.append(crop_landmarks)
            entry.update(output=output, landmarks_crop=crop_landmarks.tolist())
        entries.append(entry)
    (root / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return landmarks


def test_prepared_output_is_read_from_its_manifest(tmp_path):
    rows = [("n1/a.jpg", "n1", "ok"), ("n1/b.jpg", "n1", "no_face"), ("n1/c.jpg", "n1", "multiple_faces"),
            ("n2/a.jpg", "n2", "ok"), ("n2/b.jpg", "n2", "truncated"), ("n3/a.jpg", "n3", "ok")]
    landmarks = write_prepared(tmp_path / "prepared", 64, "vggface2", rows)
    data = build("vggface2", root=str(tmp_path / "prepared"), mask="landmarks")
    assert data.prepared and len(data) == 4
    assert data.paths == ["images/n1/a.png", "images/n1/c.png", "images/n2/a.png", "images/n3/a.png"]
    assert data.identity_labels.tolist() == [0, 0, 1, 2]
    usable_rows = [0, 2, 3, 5]
    for position, (item_index, expected) in enumerate(zip(range(4), landmarks)):
        item = data[item_index]
        check_item(item)
        assert np.abs(item_colour(item) - colour(usable_rows[position])).max() < 3
        np.testing.assert_allclose(item["landmarks"].numpy(), scale_points(expected, 64, S), atol=1e-4)
        assert torch.equal(item["mask"][0], torch.from_numpy(inner_face_mask(item["landmarks"].numpy(), S)))
    # The same output read by another class warns but keeps the manifest's identities.
    with pytest.warns(UserWarning, match="prepared with --dataset vggface2"):
        other = build("identity_folder", root=str(tmp_path / "prepared"))
    assert other.identity_labels.tolist() == [0, 0, 1, 2]
    (tmp_path / "prepared/images/n2/a.png").unlink()
    with pytest.raises(UserError, match="rerun `id2face prepare`"):
        data[2]


def test_file_names_that_are_not_utf8_are_read_raw_and_prepared(tmp_path):
    # os.walk and json give such a name (Latin-1 "caf\xe9.jpg") as surrogate escapes; encoding it
    # to UTF-8 raised UnicodeEncodeError once `prepare` had accepted the photo.
    latin1 = os.fsdecode(b"caf\xe9")
    raw = tmp_path / "raw"
    try:
        write_image(raw / "p1" / f"{latin1}.jpg", 0)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    write_image(raw / "p1/b.jpg", 1)
    data = build("identity_folder", root=str(raw))
    assert data.paths == ["p1/b.jpg", f"p1/{latin1}.jpg"]
    assert np.abs(item_colour(data[1]) - colour(0)).max() < 3
    write_prepared(tmp_path / "prepared", 64, "identity_folder", [(f"p1/{latin1}.jpg", "p1", "ok"),
                                                                  ("p1/b.jpg", "p1", "ok")])
    prepared = build("identity_folder", root=str(tmp_path / "prepared"))
    assert prepared.paths == [f"images/p1/{latin1}.png", "images/p1/b.png"]
    check_item(prepared[0])
    assert np.abs(item_colour(prepared[0]) - colour(0)).max() < 3


def test_prepare_then_read_celeba_end_to_end(tmp_path):
    """`prepare --dataset celeba` on a CelebA-layout tree of real faces, then the celeba dataset."""
    skimage_data = pytest.importorskip("skimage.data")
    from id2face.data.prepare import PrepareSettings, prepare

    astronaut = skimage_data.astronaut()
    raw = tmp_path / "CelebA"
    make_celeba(raw)
    for index, name in enumerate(CELEBA_IDS):  # replace the flat colours by faces (one unreadable)
        face = Image.fromarray(astronaut[10 + 8 * index:330 + 8 * index, 70:390]).resize((178, 218))
        face = face.transpose(Image.FLIP_LEFT_RIGHT) if index % 2 else face
        face.save(raw / "img_align_celeba" / name)
    (raw / "img_align_celeba/000004.jpg").write_bytes(b"")
    summary = prepare(raw, tmp_path / "aligned", PrepareSettings(size=64, dataset="celeba"), threads=1, progress=False)
    assert summary.usable == 5 and summary.statuses == {"empty_file": 1, "ok": 5}
    assert summary.ignored_files == 2  # the identity and partition files
    data = build("celeba", root=str(tmp_path / "aligned"))
    assert data.prepared and len(data) == 5
    assert [data.identity_names[i] for i in data.identity_labels] == ["2880", "2880", "17", "10177", "5"]
    template = template_landmarks(S)
    for index in range(5):
        item = data[index]
        check_item(item)
        assert np.linalg.norm(item["landmarks"][:2].numpy() - template[:2], axis=1).max() < 2.5
    test = build("celeba", root=str(tmp_path / "aligned"), partition="test")
    assert [test.identity_names[i] for i in test.identity_labels] == ["10177", "5"]


def test_hflip_item_mirrors_image_mask_and_landmarks(tmp_path):
    write_image(tmp_path / "a/x.png", 0)
    item = build("identity_folder", root=str(tmp_path))[0]
    item["image"][:, :, :4] = 1.0  # a marker on the left edge
    flipped = hflip_item(item)
    assert torch.all(flipped["image"][:, :, -4:] == 1.0)
    landmarks = flipped["landmarks"].numpy()
    assert landmarks[0, 0] < landmarks[1, 0] and landmarks[3, 0] < landmarks[4, 0]
    assert torch.equal(hflip_item(flipped)["image"], item["image"])


def test_real_datasets_feed_same_identity_pair_batches(tmp_path):
    """identity_labels are what the pair sampler needs: a/b of a batch share the identity."""
    from id2face.data.datamodule import FacePairDataModule

    for person in range(10):
        for shot in range(3):
            write_image(tmp_path / f"p{person}" / f"{shot}.png", 3 * person + shot)
    module = FacePairDataModule({"dataset": {"name": "identity_folder", "params": {"root": str(tmp_path)}},
                                 "image_size": S, "batch_size": 4})
    batch = next(iter(module.train_dataloader()))
    assert batch["a"]["image"].shape == (4, 3, S, S) and batch["b"]["mask"].shape == (4, 1, S, S)
    assert torch.equal(batch["a"]["identity"], batch["b"]["identity"])
    assert (batch["a"]["identity"] >= 0).all()
    # Pairs are two different photos of one person (flat colours differ per photo).
    assert (batch["a"]["image"] - batch["b"]["image"]).abs().amax(dim=(1, 2, 3)).min() > 0.05
