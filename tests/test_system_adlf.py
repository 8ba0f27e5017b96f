"""[20] aggregated deep local features (stac_rscbir.systems.adlf): VLAD, query expansion and the
attention pooling on hand-computed cases; the descriptor end to end on a tiny image set."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stac_rscbir.data.imagefolder import read_labels_csv
from stac_rscbir.descriptors.cache import cached_descriptors
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.systems.adlf import (
    SPEC,
    AdlfVlad,
    AttentionPool,
    QueryExpansion,
    train_attention,
    vlad,
)


def test_vlad_two_codewords_three_features() -> None:
    """c0 = (0, 0), c1 = (4, 0). x1 = (1, 0) and x2 = (0, 2) are nearest c0 (squared distances
    1 < 9 and 4 < 20), x3 = (4, 3) nearest c1 (9 < 25). Residual sums v0 = (1, 2), v1 = (0, 3);
    intra-normalised (1, 2)/sqrt5 and (0, 1); signed square root (1, sqrt2)/5^(1/4) and (0, 1),
    whose squared norm is 3/sqrt5 + 1; divided by its square root."""
    got = vlad(np.array([[1.0, 0], [0, 2], [4, 3]]), np.array([[0.0, 0], [4, 0]]))
    root4 = 5**0.25
    expected = np.array([1 / root4, math.sqrt(2) / root4, 0, 1]) / math.sqrt(1 + 3 / math.sqrt(5))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got, [0.437016, 0.618034, 0, 0.653491], atol=1e-6)
    assert got.dtype == np.float32


def test_vlad_signs_and_empty_codewords() -> None:
    """A negative residual keeps its sign under the square root; a codeword no feature is
    nearest to stays zero: x = (-1, 0) against c0 = (0, 0) -> v0 = (-1, 0), v1 = 0."""
    got = vlad(np.array([[-1.0, 0]]), np.array([[0.0, 0], [5, 5]]))
    np.testing.assert_allclose(got, [-1, 0, 0, 0])


# the 4-point database of the query expansion tests; the query is q = (1, 0)
DB = np.array([[0.8, 0.6], [0.0, 1.0], [0.28, -0.96], [-1.0, 0.0]])


def test_query_expansion_average_re_ranks() -> None:
    """Cosines to q = (1, 0): 0.8, 0, 0.28, -1, so L2 ranks x0, x2, x1, x3. Average QE with
    k = 1: q' = (q + x0) / ||q + x0|| = (1.8, 0.6) / sqrt(3.6) = (0.948683, 0.316228);
    q'.x = 0.948683, 0.316228, -0.037947, -0.948683; distances 2 - 2 q'.x. x1 now comes
    before x2: the top neighbour pulled the query towards it."""
    dist = QueryExpansion(k=1, alpha=0.0)(np.array([[1.0, 0.0]]), DB)
    cos = np.array([0.948683, 0.316228, -0.037947, -0.948683])
    np.testing.assert_allclose(dist[0], 2 - 2 * cos, atol=1e-5)
    assert dist.shape == (1, 4)
    assert list(np.argsort(dist[0])) == [0, 1, 2, 3]
    assert list(np.argsort(-(DB @ [1.0, 0.0]))) == [0, 2, 1, 3]


def test_alpha_query_expansion_weights_neighbours_by_cosine_power() -> None:
    """k = 2, alpha = 2: neighbours x0 (cos 0.8) and x2 (cos 0.28) with weights 0.64 and
    0.0784: q + 0.64 x0 + 0.0784 x2 = (1.533952, 0.308736), norm 1.564713, so
    q' = (0.980341, 0.197312); the rows are L2-normalised first, so a scaled query or database
    gives the same distances."""
    qe = QueryExpansion(k=2, alpha=2.0)
    dist = qe(np.array([[3.0, 0.0]]), DB * 7)
    q = np.array([0.980341, 0.197312])
    np.testing.assert_allclose(dist[0], 2 - 2 * DB @ q, atol=1e-5)


def test_query_expansion_ignores_negative_cosines_under_alpha() -> None:
    """k = 4 takes x3 (cos -1): its weight is max(-1, 0)^alpha = 0 for alpha > 0."""
    with_all = QueryExpansion(k=4, alpha=1.0)(np.array([[1.0, 0.0]]), DB)
    without = QueryExpansion(k=3, alpha=1.0)(np.array([[1.0, 0.0]]), DB)
    np.testing.assert_allclose(with_all, without)


def test_attention_pooling_shapes_and_constant_scores() -> None:
    """(B, C, h, w) maps -> (B, h, w) scores, (B, C) pooled features, (B, classes) logits. With
    the scorer's last convolution zeroed, every score is softplus(0) = log 2, so the pooling is
    log 2 times the mean of the L2-normalised features, and the unweighted pooling their mean."""
    torch.manual_seed(0)
    pool = AttentionPool(channels=5, classes=3, hidden=4)
    maps = torch.randn(2, 5, 3, 4)
    assert pool.scores(maps).shape == (2, 3, 4)
    assert (pool.scores(maps) >= 0).all()
    assert pool.pooled(maps).shape == (2, 5) and pool(maps).shape == (2, 3)
    with torch.no_grad():
        pool.score[2].weight.zero_()
        pool.score[2].bias.zero_()
    torch.testing.assert_close(pool.scores(maps), torch.full((2, 3, 4), math.log(2.0)))
    unit_mean = (maps / maps.norm(dim=1, keepdim=True)).mean(dim=(2, 3))
    torch.testing.assert_close(pool.pooled(maps), math.log(2.0) * unit_mean)
    torch.testing.assert_close(pool.pooled(maps, attend=False), unit_mean)


def test_selected_keeps_the_highest_attention_positions() -> None:
    """A scorer reading channel 0 (relu, weight 1, softplus: increasing) keeps the positions of
    the largest channel-0 values, each feature L2-normalised."""
    pool = AttentionPool(channels=2, classes=2, hidden=1)
    with torch.no_grad():
        pool.score[0].weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        pool.score[0].bias.zero_()
        pool.score[2].weight.fill_(1.0)
        pool.score[2].bias.zero_()
    maps = torch.tensor([[[[1.0, 5.0], [3.0, 2.0]], [[0.0, 0.0], [4.0, 1.0]]]])  # (1, 2, 2, 2)
    adlf = AdlfVlad(keep=2)
    adlf.attention = pool.eval()
    got = adlf.selected(maps)
    np.testing.assert_allclose(got, [[[1.0, 0.0], [0.6, 0.8]]])  # (5, 0) then (3, 4) / 5


def test_train_attention_finds_the_discriminative_position_and_is_seeded() -> None:
    """Class 1 has one strong channel-0 feature at the centre of its 3 x 3 map, class 0 none: CE
    through the attention-weighted pooling separates the classes, and each class-1 map's
    highest score is at the centre (position 4); the same seed gives the same scorer."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(16, 3, 3, 3, generator=gen) * 0.1
    labels = np.array([0, 1] * 8)
    maps[labels == 1, 0, 1, 1] = 3.0
    first = train_attention(maps, labels, epochs=30, batch_size=8, lr=0.05)
    second = train_attention(maps, labels, epochs=30, batch_size=8, lr=0.05)
    with torch.no_grad():
        assert (first(maps).argmax(1).numpy() == labels).all()
        assert (first.scores(maps)[labels == 1].reshape(8, 9).argmax(1) == 4).all()
        torch.testing.assert_close(first.scores(maps), second.scores(maps))


def _tiny_folder(root: Path) -> Path:
    """2 classes x 4 synthetic 64 px PNGs (bright squares / horizontal stripes)."""
    rng = np.random.default_rng(0)
    rows = []
    for name in ("squares", "stripes"):
        (root / name).mkdir()
        for i in range(4):
            img = rng.integers(0, 40, (64, 64, 3)).astype(np.uint8)
            if name == "squares":
                img[8 * i : 8 * i + 24, 16:40] = 230
            else:
                img[:: 8 - i, :] = 220
            Image.fromarray(img).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name))
    labels = root / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "class"), *rows])
    return labels


def test_adlf_vlad_end_to_end_and_the_noqe_row_shares_the_cache(tmp_path: Path) -> None:
    """fit + transform on 64 px images (4 x 4 block-11 maps): L2-normalised rows of
    words * local_dim; the training rows kept from fit equal a fresh transform's; the noqe spec
    reads the cached descriptors of adlf-vlad instead of computing them again."""
    data = read_labels_csv(tmp_path, _tiny_folder(tmp_path))
    spec = replace(
        SPEC, factory=lambda: AdlfVlad(keep=8, local_dim=4, words=2, epochs=2), input_size=64
    )
    noqe = replace(DESCRIPTORS["adlf-vlad-noqe"], factory=spec.factory, input_size=64)
    train = np.array([0, 1, 2, 4, 5, 6])
    feats, _ = cached_descriptors(data, spec, train, tmp_path / "cache", progress=False)
    assert feats.shape == (8, 8) and feats.dtype == np.float32
    computed = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
    assert len(computed) == 1 and computed[0].startswith("descriptor-adlf-vlad-64-")
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    again, seconds = cached_descriptors(data, noqe, train, tmp_path / "cache", progress=False)
    assert seconds == 0.0
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) == computed  # no new file
    np.testing.assert_array_equal(again, feats)

    from stac_rscbir.descriptors.cache import _ImageFiles

    images = list(_ImageFiles(data.paths, 64))
    adlf = AdlfVlad(keep=8, local_dim=4, words=2, epochs=2).fit(
        [images[i] for i in train], data.labels[train]
    )
    kept = adlf.transform(images)
    adlf._train_rows.clear()
    np.testing.assert_allclose(adlf.transform(images), kept, atol=1e-5)


def test_registered_specs() -> None:
    spec, noqe = DESCRIPTORS["adlf-vlad"], DESCRIPTORS["adlf-vlad-noqe"]
    assert isinstance(spec.distance, QueryExpansion) and spec.learns and not spec.any_bands
    assert noqe.distance is None and noqe.descriptors_of == "adlf-vlad"
    assert noqe.factory is spec.factory and noqe.input_size == spec.input_size


def test_fit_needs_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        AdlfVlad().fit([np.zeros((32, 32, 3), np.float32)])
