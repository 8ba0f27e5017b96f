"""[21] Siamese GCN (stac_rscbir.systems.sgcn): the pieces against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.graph import rag_mean_color

from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.systems.sgcn import (
    GraphConv,
    RegionGraph,
    SiameseGCN,
    block_diagonal,
    contrastive_loss,
    normalized_adjacency,
    region_adjacency,
    region_features,
    region_means,
    sample_pairs,
)

# four 2x2 regions: 0 | 1 over 2 | 3 (4-adjacent: 0-1, 0-2, 1-3, 2-3; not the diagonals)
QUAD = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=np.int64)
QUAD_COLOURS = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.2, 0], [0.1, 0.2, 0]], dtype=np.float32)


def quad_image() -> np.ndarray:
    return QUAD_COLOURS[QUAD]  # (4, 4, 3), each region one flat colour


def test_propagation_on_a_weighted_path_by_hand() -> None:
    # 0 -1.0- 1 -0.5- 2: A + I has degrees 2, 2.5, 1.5
    rows, cols, vals = normalized_adjacency(3, np.array([[0, 1], [1, 2]]), np.array([1.0, 0.5]))
    dense = np.zeros((3, 3))
    dense[rows, cols] = vals
    expected = np.array(
        [
            [1 / 2, 1 / np.sqrt(5), 0],
            [1 / np.sqrt(5), 1 / 2.5, 0.5 / np.sqrt(3.75)],
            [0, 0.5 / np.sqrt(3.75), 1 / 1.5],
        ]
    )
    np.testing.assert_allclose(dense, expected, rtol=1e-6)
    # one GraphConv with W = I, b = 0 is exactly Â H
    graph = RegionGraph(
        np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], np.float32),
        np.array([[0, 1], [1, 2]]),
        np.array([1.0, 0.5], np.float32),
    )
    adj, x, owner = block_diagonal([graph])
    conv = GraphConv(2, 2)
    with torch.no_grad():
        conv.linear.weight.copy_(torch.eye(2))
        out = conv(adj, x).numpy()
    np.testing.assert_allclose(out, expected @ graph.features, rtol=1e-6)
    assert owner.tolist() == [0, 0, 0]


def test_block_diagonal_stacks_the_graphs_without_crosstalk() -> None:
    g = RegionGraph(np.eye(3, dtype=np.float32), np.array([[0, 1], [1, 2]]), np.ones(2, np.float32))
    h = RegionGraph(np.ones((2, 3), np.float32), np.array([[0, 1]]), np.ones(1, np.float32))
    adj, x, owner = block_diagonal([g, h])
    dense = adj.to_dense().numpy()
    assert dense.shape == (5, 5) and x.shape == (5, 3)
    assert not dense[:3, 3:].any() and not dense[3:, :3].any()
    np.testing.assert_allclose(dense[3:, 3:], np.full((2, 2), 0.5), rtol=1e-6)  # degrees 2, 2
    assert owner.tolist() == [0, 0, 0, 1, 1]


def test_rag_of_four_regions_by_hand_and_as_skimage_builds_it() -> None:
    image = quad_image()
    colours = region_means(image.astype(np.float64), QUAD, 4)
    np.testing.assert_allclose(colours, QUAD_COLOURS, atol=1e-7)
    edges, weights = region_adjacency(QUAD, colours, sigma=0.01)
    assert edges.tolist() == [[0, 1], [0, 2], [1, 3], [2, 3]]
    # squared colour distances 0.01, 0.04, 0.04, 0.01 over sigma 0.01
    np.testing.assert_allclose(weights, np.exp([-1.0, -4.0, -4.0, -1.0]), rtol=1e-5)
    rag = rag_mean_color(image, QUAD, connectivity=1, mode="similarity", sigma=0.01)
    assert sorted(tuple(sorted(e)) for e in rag.edges) == [tuple(e) for e in edges.tolist()]
    for (i, j), w in zip(edges.tolist(), weights, strict=True):
        assert rag[i][j]["weight"] == pytest.approx(float(w), rel=1e-5)


def test_region_features_of_flat_quadrants() -> None:
    feats = region_features(quad_image(), QUAD)
    assert feats.shape == (4, 2 * 3 + 18)
    np.testing.assert_allclose(feats[:, :3], QUAD_COLOURS, atol=1e-6)  # band means
    np.testing.assert_allclose(feats[:, 3:6], 0.0, atol=1e-6)  # flat regions: no deviation
    np.testing.assert_allclose(feats[:, 6:16].sum(axis=1), 1.0, rtol=1e-6)  # LBP histograms
    np.testing.assert_allclose(feats[:, 21], 0.25)  # area fraction
    np.testing.assert_allclose(
        feats[:, 22:24], [[0.125, 0.125], [0.125, 0.625], [0.625, 0.125], [0.625, 0.625]]
    )


def test_contrastive_loss_by_hand() -> None:
    a = torch.zeros(3, 2)
    b = torch.tensor([[0.6, 0.8], [0.3, 0.4], [1.8, 2.4]])  # d = 1, 0.5, 3
    same = torch.tensor([True, False, False])
    # 1/2 * 1^2, 1/2 * (2 - 0.5)^2, 0 (beyond the margin): mean (0.5 + 1.125 + 0) / 3
    loss = contrastive_loss(a, b, same, margin=2.0)
    assert loss.item() == pytest.approx((0.5 + 1.125) / 3, rel=1e-5)


def test_pairs_follow_the_labels() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    first, second, same = sample_pairs(labels, np.random.default_rng(0))
    assert sorted(first.tolist()) == list(range(6))
    assert (first != second).all()
    np.testing.assert_array_equal(same, labels[first] == labels[second])


def test_fit_transform_shapes_and_determinism() -> None:
    rng = np.random.default_rng(0)
    images = [rng.random((32, 32, 3), dtype=np.float32) for _ in range(10)]
    labels = np.arange(10) % 2

    def make() -> SiameseGCN:
        return SiameseGCN(segments=8, hidden=8, dim=16, epochs=2, batch_pairs=4)

    out = make().fit(images, labels).transform(images)
    assert out.shape == (10, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out, make().fit(images, labels).transform(images))
    with pytest.raises(ValueError, match="labels"):
        make().fit(images)
    assert DESCRIPTORS["sgcn"].learns and DESCRIPTORS["sgcn"].input_size == 128
