"""Training data loading: what one image of a pair batch costs the host, and the training
loader's images/s against the number of workers, set against the step's appetite.

A GPU step eats images at a rate (the H100's eager SD-1.5 step: 91.3 img/s; the MFU target's
step: ~144 img/s, 32 images in 222 ms); the loader's workers must make them at least as fast, or
the GPU waits. This measures the loader the training command builds (``FacePairDataModule``'s
training loader: pairs, collate, the real dataset class reading prepared crops) on the host it
runs on.

    .venv/bin/python benchmarks/data_loading.py [--root DATASET --dataset NAME] [--image-size 512]
        [--files 320 --per-identity 4] [--batch 16] [--workers 0 1 2] [--batches 12] [--rounds 3]
        [--step-rates 91.3 144]

Without ``--root`` it writes a prepared folder (``id2face prepare``'s layout: manifest, PNG crops at
its ``compress_level``) of crops of natural photos (scikit-image's sample photos, colour-jittered
per file so no two files are the same) into a temporary folder; PNG decode time depends on the
content, and smooth synthetic faces decode several times faster than photos. With ``--root`` it
reads a dataset of yours (``--dataset`` its registered name; prepared or raw layout).

Tables: the host milliseconds per image of each part of an item, of the whole item, and of the
collate of each pixel transport (one thread, the median of ``--repeats`` calls); the loader's
startup (workers forked, first batch) and steady images/s per worker count for each
``data.pixel_transport`` (images and masks leave the workers as float32 or as uint8), the median
of ``--rounds`` interleaved runs. The last line is a JSON object with every figure,
``workers_needed`` among them: per step rate, the workers that make it at the one-worker rate
measured here (a host whose cores are all busy gets less).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import _common as C  # noqa: E402

PNG_COMPRESS_LEVEL = 3  # id2face.data.prepare writes its crops with this level
ITEM_PART = "dataset item (all of the above, mask, landmarks)"


def write_prepared_folder(root: Path, files: int, per_identity: int, size: int, seed: int = 0) -> None:
    """``files`` crops of ``size`` px, ``per_identity`` to an identity, as ``id2face prepare`` lays them out."""
    rng = np.random.default_rng(seed)
    photos = C.sample_photos()
    (root / "images").mkdir(parents=True)
    (root / "prepare.json").write_text(json.dumps({"format": 1, "size": size, "face_scale": 1.0,
                                                   "dataset": "identity_folder"}))
    entries = []
    for index in range(files):
        photo = photos[index % len(photos)]
        side = int(min(photo.shape[:2]) * rng.uniform(0.6, 1.0))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        crop = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(crop, dtype=np.float32) * rng.uniform(0.85, 1.15, size=3)
        output = f"images/{index:05d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / output, format="PNG",
                                                                       compress_level=PNG_COMPRESS_LEVEL)
        entries.append({"source": f"{index:05d}.jpg", "output": output, "status": "ok", "message": "",
                        "identity": f"id{index // per_identity:04d}"})
    (root / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def part_costs(dataset, pairs, batch: int, repeats: int) -> dict[str, float]:
    """Host ms per image of each part of making an item (one thread, the dataset's first file),
    collate included."""
    from id2face.data.pairs import augmented_view
    from id2face.data.pixels import PAIR_COLLATES

    path = dataset.root / dataset.paths[0]
    size = dataset.image_size

    def decode():
        with Image.open(path) as pil:
            return np.asarray(pil.convert("RGB"))

    pixels = decode()
    resize_ms = 0.0
    if pixels.shape[0] != size:
        resize_ms = C.median_ms(lambda: np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC)),
                                repeats)
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
    item = dataset[0]
    items = [pairs[i % len(pairs)] for i in range(batch)]
    images_per_batch = 2 * batch
    rng = np.random.default_rng(0)
    return {
        "read + decode the file": C.median_ms(decode, repeats),
        "resize to image_size": resize_ms,
        "uint8 -> float tensor": C.median_ms(
            lambda: torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0, repeats),
        ITEM_PART: C.median_ms(lambda: dataset[0], repeats),
        "augmented view (a pair partner of a one-image identity)": C.median_ms(
            lambda: augmented_view(item, rng), repeats),
        **{f"collate, {transport} transport": C.median_ms(lambda: collate(items), max(3, repeats // 4))
           / images_per_batch for transport, collate in PAIR_COLLATES.items()},
    }


def batch_bytes(batch: dict) -> int:
    return sum(value.nbytes for side in batch.values() for value in side.values() if isinstance(value, torch.Tensor))


def loader_rate(datamodule, workers: int, batches: int, transport: str) -> dict:
    """Startup (iterator made and first batch) and the steady images/s of the next ``batches``."""
    from id2face.data.pixels import pair_collate

    datamodule.num_workers = workers
    datamodule.collate = pair_collate(transport)
    loader = datamodule.train_dataloader()
    if len(loader) < batches + 1:
        raise SystemExit(f"the training split makes {len(loader)} batches; --batches {batches} needs "
                         f"{batches + 1}: more --files or a smaller --batch")
    started = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    startup = time.perf_counter() - started
    images = 0
    started = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        images += sum(side["image"].shape[0] for side in batch.values())
    seconds = time.perf_counter() - started
    del iterator
    return {"workers": workers, "transport": transport, "startup_s": round(startup, 3),
            "img_per_s": round(images / seconds, 1), "batch_mib": round(batch_bytes(first) / 2**20, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="a prepared dataset folder (default: write one of photo crops)")
    parser.add_argument("--dataset", default="identity_folder", help="registered dataset reading --root")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--files", type=int, default=320, help="crops written without --root")
    parser.add_argument("--per-identity", type=int, default=4, help="crops per identity without --root")
    parser.add_argument("--batch", type=int, default=16, help="pairs per batch (2 images each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12, help="timed batches after the first, per worker count")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per part")
    parser.add_argument("--rounds", type=int, default=3, help="loader runs per row (the median is reported)")
    parser.add_argument("--step-rates", type=float, nargs="*", default=[91.3, 144.0],
                        help="images/s a training step consumes (default: the H100's eager SD-1.5 step, and "
                             "the MFU target's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a loader worker (torch sets one thread there)

    from id2face.data.datamodule import FacePairDataModule
    from id2face.data.pixels import PAIR_COLLATES

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.root) if args.root else Path(scratch) / "prepared"
        if not args.root:
            C.progress(f"writing {args.files} crops of {args.image_size} px to {root}")
            write_prepared_folder(root, args.files, args.per_identity, args.image_size)
        datamodule = FacePairDataModule({"dataset": {"name": args.dataset, "params": {"root": str(root)}},
                                         "image_size": args.image_size, "batch_size": args.batch,
                                         "split_fractions": [0.9, 0.05, 0.05]})
        datamodule.setup("fit")
        dataset = datamodule.dataset
        file_kib = np.mean([(dataset.root / p).stat().st_size for p in dataset.paths[:32]]) / 1024
        C.progress("timing the parts of an item")
        parts = part_costs(dataset, datamodule.train_pairs, args.batch, args.repeats)
        runs: dict[tuple[int, str], list[dict]] = {}
        for round_index in range(args.rounds):  # interleaved: a busy spell of the host hits every row alike
            for workers in args.workers:
                for transport in PAIR_COLLATES:
                    C.progress(f"round {round_index + 1}: loader with {workers} workers, {transport} transport")
                    runs.setdefault((workers, transport), []).append(
                        loader_rate(datamodule, workers, args.batches, transport))
        rows = [{**measured[0], "startup_s": round(C.median([m["startup_s"] for m in measured]), 3),
                 "img_per_s": round(C.median([m["img_per_s"] for m in measured]), 1)} for measured in runs.values()]

    print(f"# {C.machine_description(torch.device('cpu'))}; {dataset!r}; files {file_kib:.0f} KiB; "
          f"batch {args.batch} pairs = {2 * args.batch} images")
    C.print_table(["part of an image", "host ms"], [[name, f"{ms:.2f}"] for name, ms in parts.items()])
    print()
    C.print_table(["workers", "transport", "batch MiB", "startup s", "images/s"],
                  [[r["workers"], r["transport"], r["batch_mib"], r["startup_s"], r["img_per_s"]] for r in rows])
    print()
    per_worker, needed = {}, {}
    for transport in PAIR_COLLATES:
        measured = [r["img_per_s"] for r in rows if r["workers"] == 1 and r["transport"] == transport]
        # Without a one-worker row: from the parts (no hand-over between processes: an upper bound).
        item_ms = parts[ITEM_PART] + parts[f"collate, {transport} transport"]
        per_worker[transport] = measured[0] if measured else 1e3 / item_ms
        needed[transport] = {f"{rate:g}": math.ceil(rate / per_worker[transport]) for rate in args.step_rates}
        print(f"{transport}: {per_worker[transport]:.1f} img/s per worker; workers needed at "
              + ", ".join(f"{rate} img/s: {n}" for rate, n in needed[transport].items()))
    figures = {"image_size": args.image_size, "batch_pairs": args.batch, "file_kib": round(float(file_kib), 1),
               "part_ms": {name: round(ms, 3) for name, ms in parts.items()}, "loader": rows,
               "img_per_s_per_worker": {t: round(r, 1) for t, r in per_worker.items()}, "workers_needed": needed,
               "machine": C.machine_description(torch.device("cpu"))}
    C.print_json(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
