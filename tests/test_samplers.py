"""Behavioural tests of the mini-batch samplers, online miners and band-aware augmentation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from stac_rscbir.models.augment import Augment, InUnits
from stac_rscbir.models.mining import (
    all_valid_triplets,
    batch_hard_triplets,
    graded_similarity_matrix,
    positive_negative_masks,
    semi_hard_triplets,
    similarity_matrix,
)
from stac_rscbir.models.samplers import (
    ClassPairTripletSampler,
    MultiLabelTripletSampler,
    PairSampler,
    PKBatchSampler,
    RandomBatchSampler,
)

torch.set_num_threads(1)

# classes 0..2 have 6/5/4 images, class 7 one image (cannot give positives); non-contiguous ids
SINGLE = np.array([0] * 6 + [1] * 5 + [2] * 4 + [7], dtype=np.int64)

# multi-hot over 4 labels; row 9 is all-zero, row 8 is the only image with label 3
MULTI = np.array(
    [
        [1, 1, 0, 0],  # 0
        [1, 0, 0, 0],  # 1
        [1, 1, 0, 0],  # 2
        [0, 1, 1, 0],  # 3
        [0, 0, 1, 0],  # 4
        [0, 0, 1, 0],  # 5
        [1, 0, 1, 0],  # 6
        [0, 1, 0, 0],  # 7
        [0, 0, 0, 1],  # 8
        [0, 0, 0, 0],  # 9
    ],
    dtype=np.int64,
)


def shared(i: int, j: int, y: np.ndarray = MULTI) -> int:
    return int((y[i] & y[j]).sum())


def as_list(sampler: object) -> list:
    return [b for b in sampler]  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------


def test_class_pair_triplets_two_classes_per_batch() -> None:
    sampler = ClassPairTripletSampler(SINGLE, triplets_per_batch=5, num_batches=200, seed=3)
    batches = as_list(sampler)
    assert len(batches) == len(sampler) == 200
    seen_pos, seen_neg = set(), set()
    for batch in batches:
        assert len(batch) == 5
        a, p, n = (np.array(col) for col in zip(*batch, strict=True))
        assert len(set(SINGLE[np.concatenate([a, p, n])])) == 2
        assert len(set(SINGLE[a])) == 1 and len(set(SINGLE[n])) == 1
        assert (SINGLE[a] == SINGLE[p]).all()
        assert SINGLE[a][0] != SINGLE[n][0]
        assert (a != p).all()
        if (
            np.count_nonzero(SINGLE[a[0]] == SINGLE) >= 5
        ):  # without replacement when the class allows
            assert len(set(a.tolist())) == 5
        seen_pos.add(int(SINGLE[a][0]))
        seen_neg.add(int(SINGLE[n][0]))
    assert sampler.skipped_classes == [7]
    assert 7 not in seen_pos and 7 in seen_neg  # one-image class is only ever a negative
    assert seen_pos == {0, 1, 2}


def test_class_pair_triplets_flat_matches_tuples() -> None:
    tuples = as_list(ClassPairTripletSampler(SINGLE, 4, num_batches=3, seed=1))
    flat = as_list(ClassPairTripletSampler(SINGLE, 4, num_batches=3, flat=True, seed=1))
    assert [list(itertools.chain.from_iterable(t)) for t in tuples] == flat
    assert all(isinstance(i, int) for i in flat[0])


def test_class_pair_triplets_small_class_with_replacement() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    for batch in ClassPairTripletSampler(labels, triplets_per_batch=6, num_batches=20, seed=0):
        assert all(a != p and labels[a] == labels[p] != labels[n] for a, p, n in batch)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (MULTI, "MultiLabelTripletSampler"),
        (np.array([4, 4, 4]), "at least 2 classes.*class 4"),
        (np.array([0, 1, 2]), "no class has 2 images.*0, 1, 2"),
        (np.array([0.0, 1.0]), "integers"),
        (np.array([0, -1, 1]), "non-negative"),
        (np.zeros(0, dtype=int), "empty"),
    ],
)
def test_class_pair_triplets_errors(labels: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClassPairTripletSampler(labels, 2)


def test_multilabel_triplets_share_rules() -> None:
    sampler = MultiLabelTripletSampler(MULTI, triplets_per_batch=6, num_batches=100, seed=0)
    anchors = set()
    for batch in sampler:
        assert len(batch) == 6
        for a, p, n in batch:
            anchors.add(a)
            assert a != p
            assert shared(a, p) >= 1
            assert shared(a, n) == 0 and a != n
    # row 8 (unique label 3) has no positive, row 9 (no label) shares nothing: never anchors
    assert anchors == set(range(8))
    assert sampler.num_skipped_anchors == 2


def test_multilabel_triplets_min_shared() -> None:
    sampler = MultiLabelTripletSampler(MULTI, 3, num_batches=50, min_shared=2, seed=0)
    for batch in sampler:
        for a, p, n in batch:
            assert shared(a, p) >= 2 and shared(a, n) == 0
            assert {a, p} == {0, 2}  # the only pair sharing two labels


def test_multilabel_graded_positives_follow_jaccard() -> None:
    # anchor 0 = {0, 1}: positive 1 = {0, 1} (Jaccard 1) or 2 = {0} (Jaccard 1/2)
    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]])

    def freq(graded: bool) -> float:
        sampler = MultiLabelTripletSampler(labels, 5, num_batches=1500, graded=graded, seed=0)
        hits = [p == 1 for batch in sampler for a, p, _ in batch if a == 0]
        return float(np.mean(hits))

    assert 0.62 < freq(True) < 0.72  # 1 / (1 + 1/2) = 2/3
    assert 0.44 < freq(False) < 0.56  # uniform: 1/2


def test_multilabel_triplets_no_anchor_raises() -> None:
    with pytest.raises(ValueError, match="cannot build any triplet"):
        MultiLabelTripletSampler(np.array([[1, 0], [1, 0], [1, 1]]), 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        MultiLabelTripletSampler(np.array([[2, 0], [1, 0]]), 2)


def test_pk_batches_p_classes_by_k() -> None:
    sampler = PKBatchSampler(SINGLE, p=3, k=4, num_batches=30, seed=0)
    assert sampler.skipped_classes == [7]
    for batch in sampler:
        assert len(batch) == 12 == sampler.batch_size
        assert len(set(batch)) == 12
        classes = SINGLE[batch]
        assert sorted(set(classes.tolist())) == [0, 1, 2]
        for c in (0, 1, 2):
            assert (classes == c).sum() == 4
        assert all(len(set(classes[i : i + 4])) == 1 for i in range(0, 12, 4))


def test_pk_too_few_classes() -> None:
    with pytest.raises(ValueError, match=r"p=3 classes with >= 5 images.*2, 7.*replace=True"):
        PKBatchSampler(SINGLE, p=3, k=5)
    sampler = PKBatchSampler(SINGLE, p=3, k=5, replace=True, num_batches=5, seed=0)
    assert sampler.skipped_classes == [7]
    assert all(len(b) == 15 and 7 not in SINGLE[b] for b in sampler)
    with pytest.raises(ValueError, match="multi-hot"):
        PKBatchSampler(MULTI, p=2, k=2)


def test_random_batches_cover_every_index() -> None:
    sampler = RandomBatchSampler(len(SINGLE), batch_size=5, seed=0)
    batches = as_list(sampler)
    assert len(batches) == len(sampler) == 4
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(16))
    assert [len(b) for b in batches] == [5, 5, 5, 1]
    dropped = RandomBatchSampler(SINGLE, batch_size=5, drop_last=True, seed=0)
    assert [len(b) for b in dropped] == [5, 5, 5]


@pytest.mark.parametrize("labels", [SINGLE, MULTI])
def test_pair_sampler(labels: np.ndarray) -> None:
    sampler = PairSampler(labels, num_pairs=101, positive_fraction=0.3, seed=0)
    pairs = as_list(sampler)
    assert len(pairs) == len(sampler) == 101
    assert sum(s for _, _, s in pairs) == round(101 * 0.3)
    for i, j, s in pairs:
        assert i != j
        same = labels[i] == labels[j] if labels.ndim == 1 else shared(i, j, labels) >= 1
        assert bool(same) == s


def test_pair_sampler_errors() -> None:
    with pytest.raises(ValueError, match="dissimilar"):
        PairSampler(np.zeros(4, dtype=int), positive_fraction=0.5)
    assert all(s for _, _, s in PairSampler(np.zeros(4, dtype=int), positive_fraction=1.0))
    with pytest.raises(ValueError, match="positive_fraction"):
        PairSampler(SINGLE, positive_fraction=1.5)


SAMPLER_FACTORIES = {
    "random": lambda seed: RandomBatchSampler(16, 4, seed=seed),
    "pair": lambda seed: PairSampler(MULTI, 20, seed=seed),
    "class_pair": lambda seed: ClassPairTripletSampler(SINGLE, 4, num_batches=5, seed=seed),
    "multilabel": lambda seed: MultiLabelTripletSampler(
        MULTI, 4, num_batches=5, graded=True, seed=seed
    ),
    "pk": lambda seed: PKBatchSampler(SINGLE, 2, 3, num_batches=5, seed=seed),
}


@pytest.mark.parametrize("name", sorted(SAMPLER_FACTORIES))
def test_samplers_are_seeded(name: str) -> None:
    make = SAMPLER_FACTORIES[name]
    first = make(0)
    epoch0 = as_list(first)
    assert as_list(make(0)) == epoch0
    assert as_list(make(1)) != epoch0
    epoch1 = as_list(first)  # the epoch counter moved on
    assert epoch1 != epoch0
    first.set_epoch(0)
    assert as_list(first) == epoch0


# --------------------------------------------------------------------------------------------
# miners
# --------------------------------------------------------------------------------------------


def line(*xs: float) -> torch.Tensor:
    """Points on a line, as (B, 1) float64 embeddings."""
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def test_batch_hard_four_points_on_a_line() -> None:
    # x = 0, 1, 5, 6 with labels 0, 0, 1, 1 (squared distances 1, 25, 36, 16, 25, 1 ...)
    got = batch_hard_triplets(line(0, 1, 5, 6), torch.tensor([0, 0, 1, 1]))
    assert got.dtype == torch.long
    assert got.tolist() == [[0, 1, 2], [1, 0, 2], [2, 3, 1], [3, 2, 1]]


def test_batch_hard_farthest_positive_closest_negative() -> None:
    x = line(0, 2, 5, 6, 9, 20)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    expected = [[0, 4, 1], [1, 5, 0], [2, 0, 3], [3, 5, 2], [4, 0, 3], [5, 1, 4]]
    assert batch_hard_triplets(x, y).tolist() == expected
    # anchors without a positive (label 2) or negative are left out
    y3 = torch.tensor([0, 1, 0, 1, 0, 2])
    expected3 = [[0, 4, 1], [1, 3, 0], [2, 0, 3], [3, 1, 2], [4, 0, 3]]
    assert batch_hard_triplets(x, y3).tolist() == expected3
    assert batch_hard_triplets(x, torch.zeros(6, dtype=torch.long)).shape == (0, 3)


def test_batch_hard_multilabel() -> None:
    y = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]])
    x = line(0, 1, 3, 4, 10)
    # 0 ~ 1, 2; 1 ~ 0 (2 = {0} is its closest negative); 2 ~ 0; 3 and 4 have no positive
    assert batch_hard_triplets(x, y).tolist() == [[0, 2, 3], [1, 0, 2], [2, 0, 3]]


def semi_hard_case() -> tuple[torch.Tensor, torch.Tensor]:
    # anchor 0 at x=0 and its positive 1 at x=2 (d_ap = 4); negatives at x = 2.1 (d 4.41),
    # 2.5 (6.25), -1 (1, the hardest but not semi-hard) and 10 (100)
    return line(0, 2, 2.1, 2.5, -1, 10), torch.tensor([0, 0, 1, 1, 1, 1])


def test_semi_hard_picks_closest_negative_inside_margin() -> None:
    x, y = semi_hard_case()
    rows = {(a, p): n for a, p, n in semi_hard_triplets(x, y, margin=1.0).tolist()}
    assert rows[(0, 1)] == 2  # only 4.41 lies in (4, 5)
    assert rows[(1, 0)] == 2  # no negative in (4, 5) from x=2: fallback to the hardest (2.1)
    strict = semi_hard_triplets(x, y, margin=3.0, fallback_hardest=False).tolist()
    strict_rows = {(a, p): n for a, p, n in strict}
    assert strict_rows[(0, 1)] == 2  # 4.41 and 6.25 in (4, 7): the closer one
    assert (1, 0) not in strict_rows


@pytest.mark.parametrize("seed", [0, 1])
def test_semi_hard_respects_margin(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=g)
    margin = 0.7
    d = torch.cdist(x, x).pow(2)
    pos, neg = positive_negative_masks(y)
    strict = semi_hard_triplets(x, y, margin, fallback_hardest=False)
    assert len(strict) > 0
    for a, p, n in strict.tolist():
        assert pos[a, p] and neg[a, n]
        assert d[a, p] < d[a, n] < d[a, p] + margin
        in_window = neg[a] & (d[a] > d[a, p]) & (d[a] < d[a, p] + margin)
        assert d[a, n] == d[a][in_window].min()
    full = semi_hard_triplets(x, y, margin)
    pairs = torch.nonzero(pos & neg.any(1, keepdim=True)).tolist()
    assert full[:, :2].tolist() == pairs  # every (anchor, positive) pair, in order
    fell_back = 0
    for a, p, n in full.tolist():
        in_window = neg[a] & (d[a] > d[a, p]) & (d[a] < d[a, p] + margin)
        assert neg[a, n]
        if in_window.any():  # a semi-hard negative exists: the closest one is taken
            assert d[a, n] == d[a][in_window].min()
        else:  # none: the closest negative overall
            fell_back += 1
            assert d[a, n] == d[a][neg[a]].min()
    assert 0 < fell_back < len(full)  # both branches were exercised


def test_all_valid_triplets() -> None:
    expected = [
        [0, 1, 2],
        [0, 1, 3],
        [1, 0, 2],
        [1, 0, 3],
        [2, 3, 0],
        [2, 3, 1],
        [3, 2, 0],
        [3, 2, 1],
    ]
    assert all_valid_triplets(torch.tensor([0, 0, 1, 1])).tolist() == expected
    multi = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert all_valid_triplets(multi).tolist() == [[0, 1, 2], [0, 1, 3], [1, 0, 2], [1, 0, 3]]


def test_similarity_matrices() -> None:
    y = torch.tensor([[1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    sim = similarity_matrix(y)
    assert sim.dtype == torch.float32
    assert sim.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    jac = graded_similarity_matrix(y)
    assert jac[0, 1].item() == pytest.approx(0.5) and jac[3, 3].item() == 0.0
    assert torch.equal(jac.diagonal(), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert graded_similarity_matrix(y, kind="shared")[0].tolist() == [2, 1, 0, 0]
    single = similarity_matrix(torch.tensor([3, 1, 3]), torch.tensor([1, 3]), dtype=torch.bool)
    assert single.tolist() == [[False, True], [True, False], [False, True]]
    with pytest.raises(ValueError, match="same kind"):
        similarity_matrix(torch.tensor([0, 1]), y)
    with pytest.raises(ValueError, match="rows"):
        batch_hard_triplets(line(0, 1), torch.tensor([0, 1, 1]))


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------


def image(c: int = 4, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(c, h, w, generator=g) * torch.arange(1, c + 1)[:, None, None]


def sorted_bands(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(-2).sort(-1).values


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    return [torch.rot90(t, k, dims=(-2, -1)) for t in (x, x.flip(-1)) for k in range(4)]


def test_sar_is_geometric_only() -> None:
    x = image(2, seed=1)
    aug = Augment("sar", seed=0)
    for _ in range(12):
        out = aug(x)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(sorted_bands(out), sorted_bands(x))
        assert any(torch.equal(out, t) for t in dihedral(x))


def test_sar_refuses_colour_jitter() -> None:
    with pytest.raises(ValueError, match="not valid for SAR"):
        Augment("sar", brightness=0.2)
    with pytest.raises(ValueError, match="not valid for SAR"):
        Augment("sar", contrast=0.1)
    with pytest.raises(ValueError, match="SAR model"):
        Augment("optical", speckle_looks=4)


def test_sar_speckle_noise() -> None:
    x = torch.full((2, 64, 64), 0.5)
    lin = Augment("sar", speckle_looks=4, sar_scale="linear", seed=0)(x)
    assert lin.shape == x.shape and lin.dtype == x.dtype
    assert (lin > 0).all() and not torch.equal(lin, x)
    assert lin.mean().item() == pytest.approx(0.5, rel=0.05)  # E[Gamma(L, 1/L)] = 1
    x_db = torch.full((2, 64, 64), -12.0)
    db = Augment("sar", speckle_looks=4, sar_scale="db", seed=0)(x_db)
    assert torch.isfinite(db).all() and not torch.equal(db, x_db)


def test_in_units_applies_speckle_in_db_to_z_scored_sar() -> None:
    """Speckle in dB on z-scored VV/VH equals speckle on the dB values, re-normalised: the
    per-band noise in z-units is the dB noise divided by that band's std."""
    mean, std = [-12.0, -19.0], [3.0, 6.0]
    db = torch.stack([torch.full((32, 32), -12.0), torch.full((32, 32), -19.0)])
    z = (db - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    speckle = dict(sensor="sar", speckle_looks=4, hflip=0, vflip=0, rot90=False)
    out = InUnits(Augment(**speckle, seed=3), mean, std)(z[None])[0]
    direct = Augment(**speckle, seed=3)(db)
    expected = (direct - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(out, expected)
    noise_std = out.std(dim=(-2, -1))
    # the z-unit noise is 1/3 (VV) vs 1/6 (VH) of the dB noise
    assert float(noise_std[0]) == pytest.approx(2 * float(noise_std[1]), rel=0.1)
    plain = InUnits(Augment("sar", hflip=0, vflip=0, rot90=False), mean, std)
    torch.testing.assert_close(plain(z), z)  # geometry only, no flips: unchanged
    with pytest.raises(ValueError, match="2 bands"):
        plain(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="std must be positive"):
        InUnits(plain, mean, [1.0, 0.0])


def test_optical_jitter_changes_band_statistics_per_band() -> None:
    x = image(5)
    out = Augment("optical", hflip=0, vflip=0, rot90=False, seed=0)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    for b in range(5):
        assert not torch.allclose(sorted_bands(out[b]), sorted_bands(x[b]))
    ratio = out.std(dim=(-2, -1)) / x.std(dim=(-2, -1))
    assert ratio.max() - ratio.min() > 1e-3  # independent factor per band


def test_rgb_jitter_keeps_colour_balance() -> None:
    x = image(3)
    out = Augment("rgb", seed=2)(x)
    ratio = out.std(dim=(-2, -1)) / x.std(dim=(-2, -1))
    assert not torch.allclose(ratio, torch.ones(3))
    assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-4)
    with pytest.raises(ValueError, match="3 bands"):
        Augment("rgb")(image(4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.uint16])
@pytest.mark.parametrize("sensor", ["optical", "sar"])
def test_shape_and_dtype_preserved(dtype: torch.dtype, sensor: str) -> None:
    x = (image(3, 12, 20) * 1000).to(dtype)  # non-square: rot90 limited to 0/180
    extra = {"speckle_looks": 2.0, "sar_scale": "linear"} if sensor == "sar" else {}
    aug = Augment(sensor, crop_scale=(0.5, 1.0), seed=0, **extra)  # type: ignore[arg-type]
    single = aug(x)
    batch = aug(torch.stack([x, x]))
    assert single.shape == x.shape and single.dtype == dtype
    assert batch.shape == (2, *x.shape) and batch.dtype == dtype


def test_augment_is_seeded() -> None:
    x = torch.stack([image(4, seed=s) for s in range(3)])
    a = Augment("optical", crop_scale=(0.6, 1.0), seed=5)
    assert torch.equal(a(x), Augment("optical", crop_scale=(0.6, 1.0), seed=5)(x))
    assert not torch.equal(a(x), Augment("optical", crop_scale=(0.6, 1.0), seed=5)(x))
    assert not torch.equal(Augment("optical", seed=6)(x), Augment("optical", seed=5)(x))
    a.reseed(5)
    assert torch.equal(a(x), Augment("optical", crop_scale=(0.6, 1.0), seed=5)(x))
