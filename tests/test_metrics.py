"""Metrics on inputs with known answers: FID, retrieval, verification, diversity, attributes."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from id2face.errors import MissingWeightsError, UserError
from id2face.metrics import (AttributePreservation, IdentityDiversity, IdentityRetrieval, VerificationRate,
                             build_fid, landmark_expression, landmark_pose, retrieval_ranks)
from id2face.metrics.attributes import MEAN_FACE_5PT, project_mean_face


class TinyFeatures(nn.Module):
    """Fixed random projection of 8x8-pooled pixels plus channel means: a cheap FID extractor."""

    num_features = 24

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3 * 8 * 8, self.num_features - 3, generator=generator) / 8)
        self.seen_min = math.inf

    def forward(self, images):
        self.seen_min = min(self.seen_min, images.min().item())
        pooled = nn.functional.adaptive_avg_pool2d(images, 8).flatten(1)
        return torch.cat([torch.tanh(pooled @ self.projection), images.mean((2, 3))], dim=1)


def _images(n=64, seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=generator) * 1.6 - 0.8)


# ---------------------------------------------------------------- FID

def test_fid_identical_sets_is_zero_and_grows_with_shift():
    real = _images(96)
    fid = build_fid(feature_extractor=TinyFeatures())
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute().item()) < 1e-4
    assert fid.inception.seen_min < -0.5  # custom extractors get the [-1, 1] images unchanged
    values = []
    for shift in (0.05, 0.15, 0.4):
        fid.reset()
        fid.update(real, real=True)
        fid.update((real + shift).clamp(-1, 1), real=False)
        values.append(fid.compute().item())
    assert values[0] > 1e-4
    assert values[0] < values[1] < values[2]
    assert "TinyFeatures" in fid.convention and "24-d" in fid.convention


def test_fid_inception_sees_the_pixel_levels_an_image_was_read_from(random_inception_file):
    fid = build_fid(weights=random_inception_file, feature=64)
    seen = []
    fid.inception.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    levels = torch.arange(256, dtype=torch.uint8).repeat(3, 16, 1)[None]  # (1, 3, 16, 256): every level
    fid.update(levels.float() / 127.5 - 1, real=True)  # how the datasets read 8-bit photos
    assert seen[0].dtype == torch.uint8 and torch.equal(seen[0], levels)


def test_reconstruction_psnr_is_the_mean_of_each_faces():
    from id2face.commands.eval import reconstruction_metrics

    psnr, ssim = reconstruction_metrics()
    source = torch.zeros(2, 3, 8, 8)
    rebuilt = source + torch.tensor([0.002, 0.2]).view(2, 1, 1, 1)  # one good face, one poor: MSE 4e-6, 4e-2
    psnr.update(rebuilt, source)
    ssim.update(rebuilt, source)
    expected = (10 * math.log10(4 / 4e-6) + 10 * math.log10(4 / 4e-2)) / 2  # 40 dB (pooled MSE: 23.0)
    assert psnr.compute().item() == pytest.approx(expected, abs=1e-3)
    assert 0 < ssim.compute().item() <= 1


def test_fid_argument_errors():
    with pytest.raises(UserError, match="exactly one"):
        build_fid()
    with pytest.raises(UserError, match="num_features"):
        build_fid(feature_extractor=nn.Identity())
    with pytest.raises(MissingWeightsError) as err:
        build_fid(weights="/nonexistent/pt_inception.pth")
    message = str(err.value)
    assert "/nonexistent/pt_inception.pth" in message and "pt_inception-2015-12-05" in message
    assert "torch-fidelity" in message


@pytest.fixture
def random_inception_file(tmp_path, monkeypatch):
    """torch-fidelity's Inception class with random weights, saved as the release's state dict."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
    random_inception = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    monkeypatch.undo()
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception.state_dict(), path)
    return path


def test_fid_reads_inception_weights_from_a_local_file(random_inception_file):
    """The real loading path: torch-fidelity's Inception class, random weights saved as a state dict."""
    path = random_inception_file
    fid = build_fid(weights=path, feature=64)
    real = _images(8, size=64)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute().item()) < 1e-3
    assert "Inception-v3 64-d" in fid.convention
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="do not load"):
        build_fid(weights=path, feature=64)


# ---------------------------------------------------------------- retrieval

def _embeddings(n, d=32, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_retrieval_identical_embeddings_top1_is_one():
    original = _embeddings(100)
    metric = IdentityRetrieval()
    metric.update(original[:60], original[:60].clone())
    metric.update(original[60:], original[60:].clone())
    result = metric.compute()
    assert result["top1"].item() == 1.0 and result["top5"].item() == 1.0


def test_retrieval_unrelated_identities_is_at_chance():
    n, trials = 200, 20
    top1_hits, top5_hits = 0.0, 0.0
    for trial in range(trials):
        metric = IdentityRetrieval(chunk_size=64)
        metric.update(_embeddings(n, seed=2 * trial), _embeddings(n, seed=2 * trial + 1))
        result = metric.compute()
        top1_hits += result["top1"].item() * n
        top5_hits += result["top5"].item() * n
    # expected 1 and 5 hits per trial (chance = k/N); the sums over 20 trials are Poisson(20), Poisson(100)
    assert 8 <= top1_hits <= 35
    assert 70 <= top5_hits <= 130


def test_retrieval_shuffled_identities_hits_only_fixed_points():
    # anonymized face i shows person perm(i): a hit exactly where perm(i) = i (expected once: 1/N)
    n = 300
    original = _embeddings(n, seed=11)
    fixed_points = []
    for trial in range(10):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(trial))
        metric = IdentityRetrieval(top_k=(1,), chunk_size=50)
        metric.update(original, original[perm])
        fixed_points.append((perm == torch.arange(n)).sum().item())
        assert metric.compute()["top1"].item() == pytest.approx(fixed_points[-1] / n)
    assert sum(fixed_points) <= 30  # Poisson(10) over 10 trials


def test_retrieval_chunked_equals_unchunked_exactly():
    n = 257
    original = _embeddings(n, seed=3)
    anonymized = original + 1.2 * _embeddings(n, seed=4)  # partial leakage: ranks spread out
    identities = torch.arange(n) // 3
    reference = retrieval_ranks(original, anonymized, identities, chunk_size=n)
    assert 0 < (reference == 0).float().mean() < 1
    for chunk in (5, 64, 1000):
        assert torch.equal(retrieval_ranks(original, anonymized, identities, chunk_size=chunk), reference)
    for chunk in (7, 64):
        metric_a, metric_b = IdentityRetrieval(chunk_size=chunk), IdentityRetrieval(chunk_size=n)
        metric_a.update(original, anonymized, identities)
        metric_b.update(original, anonymized, identities)
        assert metric_a.compute() == metric_b.compute()


def test_retrieval_ranks_match_a_brute_force_reference():
    n = 90
    original = _embeddings(n, d=8, seed=12)
    anonymized = original + 1.5 * _embeddings(n, d=8, seed=13)
    identities = torch.randint(0, 25, (n,), generator=torch.Generator().manual_seed(14))
    identities[::7] = -1  # some unlabelled faces; uneven images per person
    for metric in ("cosine", "euclidean"):
        if metric == "cosine":
            scores = nn.functional.normalize(anonymized, dim=1) @ nn.functional.normalize(original, dim=1).T
        else:
            scores = -torch.cdist(anonymized.double(), original.double()).float()
        expected = []
        for i in range(n):
            match = [j for j in range(n) if j == i or (identities[i] >= 0 and identities[j] == identities[i])]
            best = max(scores[i, j].item() for j in match)
            expected.append(sum(scores[i, j].item() > best for j in range(n) if j not in match))
        for chunk in (4, 90):
            assert retrieval_ranks(original, anonymized, identities, metric, chunk).tolist() == expected


def test_retrieval_identity_labels_count_any_image_of_the_person():
    # two photos per person; each anonymized face equals the *other* photo of its person
    original = _embeddings(40, seed=5)
    identities = torch.arange(40) // 2
    partner = torch.arange(40) ^ 1
    anonymized = original[partner]
    without = IdentityRetrieval(top_k=(1,))
    without.update(original, anonymized)
    with_labels = IdentityRetrieval(top_k=(1,))
    with_labels.update(original, anonymized, identities)
    assert without.compute()["top1"].item() == 0.0
    assert with_labels.compute()["top1"].item() == 1.0


def test_retrieval_hand_built_ranks_and_ties():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # query 0 closest to item 1 (miss at top-1, hit at top-2); query 1 ties exactly between its own
    # item and item 0 (ties count as hits); query 2 is its own item
    queries = torch.tensor([[0.5, 1.0], [1.0, 1.0], [-1.0, 0.1]])
    ranks = retrieval_ranks(gallery, queries)
    assert ranks.tolist() == [1, 0, 0]
    metric = IdentityRetrieval(top_k=(1, 2))
    metric.update(gallery, queries)
    result = metric.compute()
    assert result["top1"].item() == pytest.approx(2 / 3) and result["top2"].item() == 1.0


def test_retrieval_euclidean_differs_from_cosine_on_scaled_vectors():
    gallery = torch.tensor([[1.0, 0.0], [3.0, 0.3]])
    queries = torch.tensor([[3.0, 0.0], [3.0, 0.3]])  # query 0: same direction as item 0, nearer item 1
    cosine, euclidean = IdentityRetrieval(top_k=(1,)), IdentityRetrieval(top_k=(1,), metric="euclidean")
    cosine.update(gallery, queries)
    euclidean.update(gallery, queries)
    assert cosine.compute()["top1"].item() == 1.0
    assert euclidean.compute()["top1"].item() == 0.5


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_retrieval_errors():
    with pytest.raises(RuntimeError, match="before any update"):
        IdentityRetrieval().compute()
    with pytest.raises(ValueError, match="aligned"):
        IdentityRetrieval().update(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(UserError, match="unknown embedding metric"):
        IdentityRetrieval(metric="manhattan")


# ---------------------------------------------------------------- verification

def _unit(degrees):
    radians = torch.deg2rad(torch.tensor(degrees, dtype=torch.float64))
    return torch.stack([torch.cos(radians), torch.sin(radians)], dim=-1).float()


# three people, two photos each, as 2-D unit vectors (angles in degrees)
VERIFY_ANGLES = [0.0, 20.0, 70.0, 95.0, 180.0, 200.0]
VERIFY_IDENTITIES = [0, 0, 1, 1, 2, 2]
# anonymizations rotated away from their source by these angles
VERIFY_OFFSETS = [10.0, 80.0, 74.0, 30.0, 100.0, 60.0]


def _verification_case(**kwargs):
    metric = VerificationRate(**kwargs)
    original = _unit(VERIFY_ANGLES)
    anonymized = _unit([a + o for a, o in zip(VERIFY_ANGLES, VERIFY_OFFSETS)])
    metric.update(original[:4], anonymized[:4], VERIFY_IDENTITIES[:4])
    metric.update(original[4:], anonymized[4:], VERIFY_IDENTITIES[4:])
    return metric.compute()


def test_verification_hand_built_case_cosine():
    # 12 impostor pairs with angle gaps 50, 70, 75, 85, 95, 105, 110, 130, 160, 160, 180, 180.
    # FAR 0.17 allows floor(0.17 * 12) = 2 false accepts: threshold = cos 75 deg (accept iff score >
    # it, i.e. angle < 75), realised FAR 2/12. Genuine gaps 20, 25, 20 all pass. Offsets < 75: 4 of 6.
    result = _verification_case(far=0.17)
    assert result["threshold"].item() == pytest.approx(math.cos(math.radians(75)), abs=1e-6)
    assert result["rate"].item() == pytest.approx(4 / 6)
    assert result["far"].item() == pytest.approx(2 / 12)
    assert result["tar"].item() == 1.0
    strict = _verification_case(far=0.0)  # no false accept allowed: threshold = cos 50 deg
    assert strict["threshold"].item() == pytest.approx(math.cos(math.radians(50)), abs=1e-6)
    assert strict["rate"].item() == pytest.approx(2 / 6) and strict["far"].item() == 0.0


def test_verification_hand_built_case_euclidean_and_fixed_threshold():
    result = _verification_case(far=0.17, metric="euclidean")
    # unit vectors: distance = 2 sin(angle / 2), monotone in the angle, so the same decisions
    assert result["threshold"].item() == pytest.approx(2 * math.sin(math.radians(37.5)), abs=1e-6)
    assert result["rate"].item() == pytest.approx(4 / 6)
    fixed = _verification_case(threshold=2 * math.sin(math.radians(35)), metric="euclidean")
    # accept iff angle < 70: offsets 10, 30, 60; impostors below 70 deg: only the 50 deg pair
    assert fixed["rate"].item() == pytest.approx(3 / 6)
    assert fixed["far"].item() == pytest.approx(1 / 12)


def test_verification_needs_labels_to_calibrate():
    metric = VerificationRate()
    metric.update(_embeddings(10), _embeddings(10, seed=1))
    with pytest.raises(UserError, match="identity labels"):
        metric.compute()


def test_verification_far_is_respected_on_random_data():
    n = 300
    identities = torch.arange(n) // 3
    centres = _embeddings(100, seed=7)
    original = centres[identities] + 0.6 * _embeddings(n, seed=8)
    metric = VerificationRate(far=0.01, chunk_size=37)
    metric.update(original, original + 0.3 * _embeddings(n, seed=9), identities)
    result = metric.compute()
    assert 0.0099 * 0.9 < result["far"].item() <= 0.01
    assert result["tar"].item() > 0.9 and result["rate"].item() > 0.9


# ---------------------------------------------------------------- diversity

def test_diversity_known_answers():
    metric = IdentityDiversity()
    same = _embeddings(5, seed=1)[:, None].expand(5, 4, 32)
    metric.update(same)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)
    metric.reset()
    metric.update(torch.eye(4)[None].repeat(3, 1, 1))  # orthogonal anonymizations: 1 - cos = 1
    assert metric.compute().item() == pytest.approx(1.0)
    metric.reset()
    metric.update(_unit([0.0, 90.0, 180.0])[None])  # pair distances 1, 2, 1
    assert metric.compute().item() == pytest.approx(4 / 3)


# ---------------------------------------------------------------- attributes

@pytest.mark.parametrize("yaw,pitch,roll", [(30, 0, 0), (-25, 0, 0), (0, 15, 0), (0, -12, 0), (0, 0, 25),
                                            (0, 0, -170)])
def test_landmark_pose_inverts_the_mean_face_exactly_for_single_rotations(yaw, pitch, roll):
    landmarks = project_mean_face(yaw, pitch, roll, scale=37.0, center=(50.0, 61.0))[None]
    assert landmark_pose(landmarks)[0].tolist() == pytest.approx([yaw, pitch, roll], abs=1e-3)


def test_landmark_pose_combined_rotations_and_signs():
    for yaw, pitch, roll in [(20, 10, 15), (-15, -8, -20), (25, -10, 5)]:
        estimate = landmark_pose(project_mean_face(yaw, pitch, roll)[None])[0]
        assert estimate.tolist() == pytest.approx([yaw, pitch, roll], abs=3.0)
    frontal = project_mean_face()
    nose_right, nose_up, right_eye_low = frontal.clone(), frontal.clone(), frontal.clone()
    nose_right[2, 0] += 3
    nose_up[2, 1] -= 3
    right_eye_low[1, 1] += 3
    poses = landmark_pose(torch.stack([frontal, nose_right, nose_up, right_eye_low]))
    assert poses[0].abs().max() < 1e-3
    assert poses[1, 0] > 5 and poses[2, 1] > 5 and poses[3, 2] > 3  # yaw right, chin up, clockwise


def test_landmark_pose_agrees_with_synthfaces_ground_truth():
    synthfaces = pytest.importorskip("id2face.data.synthfaces")
    samples = [synthfaces.render_sample(i, s, 96) for i in range(6) for s in range(5)]
    truth = torch.stack([torch.stack([it["attr_factors"][synthfaces.ATTRIBUTE_FACTORS.index(k)]
                                      * synthfaces.POSE_DEGREES[k] for k in ("yaw", "pitch", "roll")])
                         for it in samples])
    estimate = landmark_pose(torch.stack([it["landmarks"] for it in samples]))
    # yaw and roll only: SynthFaces heads are ellipsoids whose features lie on the surface (no
    # protruding nose), so pitch is barely observable from their 5 points; the oracle judges it there
    for axis in (0, 2):
        correlation = torch.corrcoef(torch.stack([truth[:, axis], estimate[:, axis].float()]))[0, 1]
        assert correlation > 0.8, (axis, correlation)


def test_landmark_expression_ratios():
    frontal = project_mean_face(scale=20.0)[None]
    width, height = landmark_expression(frontal)[0].tolist()
    assert width == pytest.approx(0.828, abs=1e-4)
    assert height == pytest.approx((1.155 - 0.57) / 1.155, abs=1e-4)
    rolled = landmark_expression(project_mean_face(roll=30, scale=55.0)[None])[0]
    assert rolled.tolist() == pytest.approx([width, height], abs=1e-4)  # invariant to roll and scale
    smiling = frontal.clone()
    smiling[0, 3, 0] -= 4  # wider mouth
    assert landmark_expression(smiling)[0, 0] > width


def test_attribute_preservation_mae_groups_nan_rows_and_wrap():
    metric = AttributePreservation(["yaw", "roll", "smile"], groups={"pose": ["yaw", "roll"]}, periodic=["roll"])
    original = torch.tensor([[10.0, 179.0, 0.5], [0.0, 0.0, 0.0], [math.nan, 0.0, 0.0]])
    anonymized = torch.tensor([[14.0, -179.0, 0.2], [-2.0, 10.0, 0.1], [1.0, 1.0, 1.0]])
    metric.update(original, anonymized)
    result = metric.compute()
    assert result["yaw"].item() == pytest.approx(3.0)
    assert result["roll"].item() == pytest.approx(6.0)  # 2 (wrapped) and 10
    assert result["smile"].item() == pytest.approx(0.2)
    assert result["pose"].item() == pytest.approx(4.5)
    assert result["valid"].item() == pytest.approx(2 / 3)


def test_mean_face_is_what_the_docstring_says():
    assert MEAN_FACE_5PT.shape == (5, 3)
    assert (MEAN_FACE_5PT[1, 0] - MEAN_FACE_5PT[0, 0]).item() == pytest.approx(1.0)  # inter-ocular unit


def test_mtcnn_pose_is_mirror_symmetric_on_a_real_photo():
    skimage_data = pytest.importorskip("skimage.data")
    from id2face.metrics import LandmarkAttributeEstimator

    photo = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 127.5 - 1
    face = photo[:, 0:256, 100:356]  # the astronaut's head and shoulders
    images = torch.stack([face, face.flip(-1)])
    estimator = LandmarkAttributeEstimator()
    attributes = estimator(images)
    assert torch.isfinite(attributes).all()
    yaw, pitch, roll = attributes[:, 0], attributes[:, 1], attributes[:, 2]
    assert yaw[0].item() == pytest.approx(-yaw[1].item(), abs=3.0)
    assert roll[0].item() == pytest.approx(-roll[1].item(), abs=2.0)
    assert pitch[0].item() == pytest.approx(pitch[1].item(), abs=3.0)
    assert attributes[0, 3:].tolist() == pytest.approx(attributes[1, 3:].tolist(), abs=0.05)
    blank = estimator(torch.zeros(1, 3, 64, 64))
    assert torch.isnan(blank).all()  # no face -> NaN row, left out by AttributePreservation
