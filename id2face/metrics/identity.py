"""Identity leakage metrics: retrieval top-k and verification rate at a fixed FAR.

Both take embeddings from a recognizer (see ``recognizers.py``), rows aligned: row i of
``original_embeddings`` is the recognizer's embedding of source face i and row i of
``anonymized_embeddings`` that of its anonymization. States are lists reduced by concatenation,
so under DDP every rank computes on the gathered set and the result equals the single-process one.

Scores: ``metric="cosine"`` ranks by cosine similarity (rows are L2-normalised here);
``metric="euclidean"`` ranks by negative Euclidean distance (dlib's convention).

Identity labels (optional for retrieval, required to calibrate verification): ``identities[i]``
is the person shown in original i, ``-1`` when unknown. With labels, a retrieval hit for query i
is *any* original of the same person in the top k (the gallery keeps every image, so the
protected person may be found through another photo); without labels (or label -1) only
original i itself counts.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ..errors import UserError

METRICS = ("cosine", "euclidean")


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise UserError(f"unknown embedding metric '{metric}'; valid: {', '.join(METRICS)}")
    return metric


def pairwise_scores(queries: Tensor, gallery: Tensor, metric: str) -> Tensor:
    """(Q, D) x (G, D) -> (Q, G) scores, higher = more similar (cosine, or -Euclidean distance)."""
    return _scores(_prepare(queries, metric), _prepare(gallery, metric), metric)


def _prepare(embeddings: Tensor, metric: str) -> tuple[Tensor, Tensor | None]:
    """Once per search, not per chunk: unit rows (cosine) or rows and their squared norms (Euclidean)."""
    if metric == "cosine":
        return torch.nn.functional.normalize(embeddings, dim=-1), None
    return embeddings, embeddings.square().sum(-1)


def _rows(prepared: tuple[Tensor, Tensor | None], rows: Tensor) -> tuple[Tensor, Tensor | None]:
    vectors, norms = prepared
    return vectors[rows], None if norms is None else norms[rows]


def _scores(queries: tuple[Tensor, Tensor | None], gallery: tuple[Tensor, Tensor | None], metric: str) -> Tensor:
    if metric == "cosine":
        return queries[0] @ gallery[0].T
    squared = queries[1][:, None] - 2 * queries[0] @ gallery[0].T + gallery[1][None, :]
    return -squared.clamp_min(0).sqrt()


def aligned_scores(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Row-wise scores of aligned (N, D) pairs, same convention as ``pairwise_scores``."""
    if metric == "cosine":
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return -(a - b).norm(dim=-1)


def _labels_or_unknown(identities: Tensor | Sequence[int] | None, n: int, device) -> Tensor:
    if identities is None:
        return torch.full((n,), -1, dtype=torch.long, device=device)
    labels = torch.as_tensor(identities, device=device).long().reshape(-1)
    if labels.numel() != n:
        raise ValueError(f"identities has {labels.numel()} entries for {n} embeddings")
    return labels


class _AlignedEmbeddings(Metric):
    """Shared state: aligned original/anonymized embeddings and optional identity labels."""

    is_differentiable = False
    full_state_update = False

    def __init__(self, metric: str = "cosine", chunk_size: int = 1024, **kwargs):
        super().__init__(**kwargs)
        self.metric = _check_metric(metric)
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.chunk_size = int(chunk_size)
        self.add_state("original", default=[], dist_reduce_fx="cat")
        self.add_state("anonymized", default=[], dist_reduce_fx="cat")
        self.add_state("identities", default=[], dist_reduce_fx="cat")

    def update(self, original_embeddings: Tensor, anonymized_embeddings: Tensor,
               identities: Tensor | Sequence[int] | None = None) -> None:
        if original_embeddings.shape != anonymized_embeddings.shape or original_embeddings.dim() != 2:
            raise ValueError(
                f"expected aligned (N, D) embeddings, got {tuple(original_embeddings.shape)} and "
                f"{tuple(anonymized_embeddings.shape)}")
        self.original.append(original_embeddings.detach().float())
        self.anonymized.append(anonymized_embeddings.detach().float())
        self.identities.append(_labels_or_unknown(identities, len(original_embeddings), original_embeddings.device))

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor]:
        if isinstance(self.original, list) and not self.original:
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        original = dim_zero_cat(self.original).float()
        anonymized = dim_zero_cat(self.anonymized).float()
        identities = dim_zero_cat(self.identities).long()
        return original, anonymized, identities


def _positive_index_table(identities: Tensor):
    """rows -> (len(rows), M) gallery indices of each query's matches (itself + same label), padded
    with the query's own index; M = the largest number of images of one labelled person."""
    n = len(identities)
    own = torch.arange(n, device=identities.device)
    labelled = identities >= 0
    if not labelled.any():
        return lambda rows: rows[:, None]
    labels, inverse, counts = torch.unique(identities[labelled], return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    members = own[labelled][order]                            # gallery indices grouped by label
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(members), device=identities.device) - offsets[inverse[order]]
    table = torch.full((len(labels), int(counts.max())), -1, dtype=torch.long, device=identities.device)
    table[inverse[order], slot] = members
    group = torch.full((n,), -1, dtype=torch.long, device=identities.device)
    group[labelled] = inverse

    def lookup(rows: Tensor) -> Tensor:
        g = group[rows]
        found = table[g.clamp_min(0)]
        found = torch.where((found >= 0) & (g[:, None] >= 0), found, rows[:, None])
        return found

    return lookup


def retrieval_ranks(gallery: Tensor, queries: Tensor, identities: Tensor | None = None,
                    metric: str = "cosine", chunk_size: int = 1024) -> Tensor:
    """For each query i, how many non-matching gallery items score strictly above its best match.

    Matches of query i: gallery item i, plus every item with the same identity label (>= 0).
    Query i is a top-k hit iff its rank < k. Ties count in favour of the match, which is the
    conservative direction for privacy (a leak is never hidden by an arbitrary tie-break).
    The search runs over chunks of ``chunk_size`` queries: peak memory O(N x chunk_size), and the
    result does not depend on the chunk size.
    """
    n = gallery.shape[0]
    if queries.shape[0] != n:
        raise ValueError("queries and gallery must be aligned (query i belongs to gallery item i)")
    identities = _labels_or_unknown(identities, n, gallery.device)
    device = gallery.device
    gallery, queries = _prepare(gallery, metric), _prepare(queries, metric)
    positives = _positive_index_table(identities)
    ranks = torch.empty(n, dtype=torch.long, device=device)
    # two N x chunk working buffers, reused by every chunk (no per-chunk allocation or page faults)
    chunk_size = min(chunk_size, n)
    scores_buffer = torch.empty(chunk_size, n, device=device)
    flags_buffer = torch.empty(chunk_size, n, dtype=torch.bool, device=device)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(start + chunk_size, n), device=device)
        c = len(rows)
        scores, flags = scores_buffer[:c], flags_buffer[:c]
        if metric == "cosine":
            torch.mm(queries[0][rows], gallery[0].T, out=scores)
        else:
            scores.copy_(_scores(_rows(queries, rows), gallery, metric))
        best_match = scores.gather(1, positives(rows)).amax(dim=1, keepdim=True)
        query_labels = identities[rows, None]
        torch.eq(query_labels, identities[None, :], out=flags)  # flags = matches of each query
        flags &= query_labels >= 0
        flags[torch.arange(c, device=device), rows] = True
        scores.masked_fill_(flags, -math.inf)
        ranks[rows] = torch.gt(scores, best_match, out=flags).sum(dim=1)
    return ranks


class IdentityRetrieval(_AlignedEmbeddings):
    """Re-identification rate: gallery = all originals, query = anonymized i.

    ``update(original_embeddings (N, D), anonymized_embeddings (N, D), identities=None)``;
    ``compute() -> {"top1": ..., "top5": ...}`` (one key per entry of ``top_k``): the share of
    anonymized faces whose source person is among the k most similar originals (lower = better
    anonymization; chance level is about k/N without labels). See the module docstring for the
    identity-label convention and ``retrieval_ranks`` for ties and chunking.
    """

    higher_is_better = False

    def __init__(self, top_k: Sequence[int] = (1, 5), metric: str = "cosine", chunk_size: int = 1024, **kwargs):
        super().__init__(metric=metric, chunk_size=chunk_size, **kwargs)
        self.top_k = tuple(int(k) for k in top_k)

    def compute(self) -> dict[str, Tensor]:
        original, anonymized, identities = self._gathered()
        ranks = retrieval_ranks(original, anonymized, identities, self.metric, self.chunk_size)
        return {f"top{k}": (ranks < k).float().mean() for k in self.top_k}


class VerificationRate(_AlignedEmbeddings):
    """Share of anonymized faces a verifier still accepts as their source, at a fixed FAR.

    The accept threshold is calibrated on the originals: genuine pairs = two different images with
    the same identity label, impostor pairs = two images with different labels (-1 = unlabelled,
    left out). Accept iff score > t, where t is the smallest impostor score that keeps the
    false-accept rate <= ``far`` (ties at t are rejected, so the realised FAR may be below ``far``).
    Then ``rate`` = share of (anonymized_i, original_i) pairs accepted. With ``threshold`` given
    (e.g. dlib's native 0.6 Euclidean distance) no calibration is done.

    ``compute() -> {"rate", "threshold", "far", "tar"}``: threshold in the recognizer's own unit
    (cosine similarity, or Euclidean distance: accept iff distance < threshold), the realised FAR
    and the genuine accept rate on the originals (NaN where pairs are missing).
    Exact: impostor scores are streamed in chunks, keeping only the top floor(far * #impostors) + 1.
    """

    higher_is_better = False

    def __init__(self, far: float = 1e-3, threshold: float | None = None, metric: str = "cosine",
                 chunk_size: int = 1024, **kwargs):
        super().__init__(metric=metric, chunk_size=chunk_size, **kwargs)
        if not 0 <= far <= 1:
            raise ValueError(f"far must be in [0, 1], got {far}")
        self.far = float(far)
        self.fixed_threshold = threshold

    def _to_score(self, threshold: float) -> float:
        return -threshold if self.metric == "euclidean" else threshold

    def _from_score(self, score: float) -> float:
        return -score if self.metric == "euclidean" else score

    def _pair_scores(self, original: Tensor, identities: Tensor, keep_top: int, fixed: float | None):
        """Stream upper-triangle pairs -> (top impostor scores, genuine scores, #impostors above ``fixed``)."""
        n = len(original)
        prepared = _prepare(original, self.metric)
        top = original.new_empty(0)
        genuine = []
        above = 0
        for start in range(0, n, self.chunk_size):
            rows = torch.arange(start, min(start + self.chunk_size, n), device=original.device)
            scores = _scores(_rows(prepared, rows), prepared, self.metric)
            upper = rows[:, None] < torch.arange(n, device=original.device)[None, :]
            labelled = (identities[rows, None] >= 0) & (identities[None, :] >= 0) & upper
            same = identities[rows, None] == identities[None, :]
            genuine.append(scores[labelled & same])
            impostor = scores[labelled & ~same]
            if fixed is not None:
                above += int((impostor > fixed).sum())
            if keep_top > 0:
                top = torch.cat([top, impostor]).topk(min(keep_top, len(top) + len(impostor))).values
        return top, torch.cat(genuine), above

    def compute(self) -> dict[str, Tensor]:
        original, anonymized, identities = self._gathered()
        labelled = identities[identities >= 0]
        counts = torch.unique(labelled, return_counts=True)[1]
        n_impostor = int((len(labelled) ** 2 - counts.square().sum().item()) // 2)
        allowed = math.floor(self.far * n_impostor + 1e-9)  # false accepts the FAR allows
        if self.fixed_threshold is not None:
            threshold = self._to_score(float(self.fixed_threshold))
            if len(labelled) > 1:  # pairs to report the realised FAR / TAR on
                _, genuine, false_accepts = self._pair_scores(original, identities, 0, threshold)
            else:
                genuine, false_accepts = original.new_empty(0), 0
        else:
            if n_impostor == 0:
                raise UserError("VerificationRate needs identity labels of the originals with at least two "
                                "different people to calibrate the threshold (or pass threshold=...)")
            keep = min(n_impostor, allowed + 1)
            top, genuine, _ = self._pair_scores(original, identities, keep, None)
            # accept iff score > the (allowed+1)-th largest impostor score; far = 1 accepts everything
            threshold = top.min().item() if keep > allowed else -math.inf
            false_accepts = int((top > threshold).sum())
        nan = torch.tensor(math.nan)
        accepted = aligned_scores(anonymized, original, self.metric) > threshold
        return {
            "rate": accepted.float().mean(),
            "threshold": torch.tensor(self._from_score(threshold)),
            "far": torch.tensor(false_accepts / n_impostor) if n_impostor else nan,
            "tar": (genuine > threshold).float().mean() if genuine.numel() else nan,
        }
