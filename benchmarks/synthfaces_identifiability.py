"""Is SynthFaces identity learnable yet invisible to pixel matching?

Protocol (top-1 identity retrieval on held-out identities): identities ``[0, train_identities)``
train small CNNs; identities ``[train_identities, train_identities + test_identities)`` are never
seen in training. For each held-out identity, sample 0 is its gallery image and samples 1..K-1
(other pose, expression, light, hair, background) are queries; a query is correct when its nearest
gallery image has its identity, so chance is 1 / test_identities. Embedders on this protocol:

- raw pixels (L2), mean colour, RGB colour histogram (Hellinger), inner-face pixels (outside the
  mask set to 0): a real identity benchmark keeps these near chance;
- ``cnn_identity``: a CNN trained as an identity classifier on identity labels only (cosine-softmax
  head, flips), its unit embedding compared by cosine: what a face recognizer would learn;
- ``cnn_factors``: the same CNN trained to regress the identity factors (SynthFaces ground truth),
  its predicted factors compared by L2: identity is recoverable from the pixels across nuisances.

    .venv/bin/python benchmarks/synthfaces_identifiability.py [--train-identities 600 ...]

Prints a table; the last line is a JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from id2face.data.synthfaces import render_sample

OBJECTIVES = ("identity", "factors")


def render_set(first_identity: int, identities: int, samples: int, size: int, seed: int) -> dict:
    """Identity-major renders: images (N, 3, S, S) in [-1, 1], masks, labels (N,), id_factors (N, F)."""
    items = [render_sample(first_identity + i, s, size, seed) for i in range(identities) for s in range(samples)]
    return {"images": torch.stack([it["image"] for it in items]),
            "masks": torch.stack([it["mask"] for it in items]),
            "labels": torch.tensor([it["identity"] for it in items]),
            "id_factors": torch.stack([it["id_factors"] for it in items])}


class SmallCNN(nn.Module):
    """Three conv stages (32 -> 16 -> 8 px at 32 px input) -> global pool -> ``out_dim`` features."""

    def __init__(self, out_dim: int, width: int = 16):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.net = nn.Sequential(
            block(3, width), block(width, width), nn.MaxPool2d(2),
            block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), block(4 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CosineClassifier(nn.Module):
    """Identity logits = scale * cos(embedding, class centre); the embedding is what retrieval uses."""

    def __init__(self, num_classes: int, embed_dim: int = 64, scale: float = 16.0):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.1)
        self.scale = scale

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(embedding, dim=-1) @ F.normalize(self.centres, dim=-1).T


def train_cnn(data: dict, objective: str, epochs: int, batch_size: int = 64, lr: float = 3e-3, width: int = 16,
              seed: int = 0, log=None) -> SmallCNN:
    """Train on ``data`` (from ``render_set``) for ``objective`` in OBJECTIVES; returns the embedder."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    torch.manual_seed(seed)
    images = data["images"].contiguous(memory_format=torch.channels_last)
    if objective == "identity":
        _, targets = torch.unique(data["labels"], return_inverse=True)
        model, head = SmallCNN(64, width), CosineClassifier(int(targets.max()) + 1)
        criterion = lambda out, idx: F.cross_entropy(head(out), targets[idx], label_smoothing=0.1)  # noqa: E731
    else:
        targets = data["id_factors"]
        model, head = SmallCNN(targets.shape[1], width), nn.Identity()
        criterion = lambda out, idx: F.mse_loss(out, targets[idx])  # noqa: E731
    model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=5e-4)
    steps = max(epochs * (len(images) // batch_size), 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            # identity factors are left/right symmetric, so a mirrored face is the same person
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], images[idx].flip(-1), images[idx])
            loss = criterion(model(x), idx)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item() * len(idx)
        if log:
            log(f"{objective} epoch {epoch + 1}/{epochs}: loss {total / (len(images) // batch_size * batch_size):.4f}")
    return model.eval()


@torch.no_grad()
def embed_all(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def top1_retrieval(features: torch.Tensor, labels: torch.Tensor, samples: int, metric: str = "l2") -> float:
    """Gallery = sample 0 of each identity, queries = the other samples (identity-major layout)."""
    features = features.reshape(len(features), -1).double()
    is_gallery = torch.arange(len(features)) % samples == 0
    gallery, queries = features[is_gallery], features[~is_gallery]
    if metric == "cosine":
        scores = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    else:
        scores = -torch.cdist(queries, gallery)
    predicted = labels[is_gallery][scores.argmax(1)]
    return (predicted == labels[~is_gallery]).double().mean().item()


def colour_histogram(images: torch.Tensor, bins: int = 8) -> torch.Tensor:
    """Square root of the normalised joint RGB histogram (Hellinger embedding), (N, bins**3)."""
    q = ((images + 1) / 2).clamp(0, 1 - 1e-6).mul(bins).long()
    index = ((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2]).reshape(len(images), -1)
    hist = torch.zeros(len(images), bins ** 3).scatter_add_(1, index, torch.ones(index.shape))
    return (hist / index.shape[1]).sqrt()


def run_benchmark(train_identities: int = 600, train_samples: int = 10, test_identities: int = 100,
                  test_samples: int = 6, size: int = 32, epochs: int = 12, objectives=OBJECTIVES,
                  seed: int = 0, width: int = 16, log=None) -> dict:
    t0 = time.perf_counter()
    train = render_set(0, train_identities, train_samples, size, seed)
    test = render_set(train_identities, test_identities, test_samples, size, seed)
    result = {
        "size": size, "train_identities": train_identities, "train_samples": train_samples,
        "test_identities": test_identities, "test_samples": test_samples, "epochs": epochs, "seed": seed,
        "render_seconds": round(time.perf_counter() - t0, 1),
        "chance": 1.0 / test_identities,
    }
    images, labels = test["images"], test["labels"]
    result["pixel_nn"] = top1_retrieval(images, labels, test_samples)
    result["mean_colour_nn"] = top1_retrieval(images.mean((2, 3)), labels, test_samples)
    result["colour_histogram_nn"] = top1_retrieval(colour_histogram(images), labels, test_samples)
    result["inner_face_pixel_nn"] = top1_retrieval((images + 1) * test["masks"], labels, test_samples)
    for objective in objectives:
        t0 = time.perf_counter()
        model = train_cnn(train, objective, epochs, width=width, seed=seed, log=log)
        result[f"cnn_{objective}_train_seconds"] = round(time.perf_counter() - t0, 1)
        metric = "cosine" if objective == "identity" else "l2"
        result[f"cnn_{objective}"] = top1_retrieval(embed_all(model, images), labels, test_samples, metric)
    return result


ROWS = [("chance", "chance"), ("pixel_nn", "pixel NN (L2)"), ("mean_colour_nn", "mean colour NN"),
        ("colour_histogram_nn", "colour histogram NN"), ("inner_face_pixel_nn", "inner-face pixels NN"),
        ("cnn_identity", "CNN, identity labels"), ("cnn_factors", "CNN, identity factors")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-identities", type=int, default=600)
    parser.add_argument("--train-samples", type=int, default=10)
    parser.add_argument("--test-identities", type=int, default=100)
    parser.add_argument("--test-samples", type=int, default=6)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma list of " + ", ".join(OBJECTIVES))
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    objectives = [o for o in args.objectives.split(",") if o]
    r = run_benchmark(args.train_identities, args.train_samples, args.test_identities, args.test_samples,
                      args.size, args.epochs, objectives, args.seed, args.width,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"SynthFaces identity retrieval, top-1 on {r['test_identities']} held-out identities "
          f"(1 gallery + {r['test_samples'] - 1} queries each), {r['size']} px; CNNs trained on "
          f"{r['train_identities']} other identities x {r['train_samples']} samples, {r['epochs']} epochs")
    print(f"{'embedder':26s} {'top-1':>7s} {'x chance':>9s}")
    for key, name in ROWS:
        if key in r:
            print(f"{name:26s} {r[key]:7.3f} {r[key] / r['chance']:9.1f}")
    print(f"render {r['render_seconds']} s; train " + ", ".join(
        f"{o} {r[f'cnn_{o}_train_seconds']} s" for o in objectives))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
