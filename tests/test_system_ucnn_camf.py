"""[14] Li et al. 2016: the unsupervised CNN trained on k-means cluster ids (``ucnn``) and the
collaborative affinity metric fusion (``ucnn-camf``), on hand-computed cases."""

from __future__ import annotations

from math import exp
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import sparse
from torch import nn

from stac_rscbir.data.imagefolder import LabelledImages
from stac_rscbir.descriptors.base import DescriptorSpec, Images
from stac_rscbir.descriptors.cache import cached_descriptors
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.systems.camf import (
    DIMS,
    CollaborativeAffinityDistance,
    FusedDescriptors,
    cross_diffusion_step,
    full_kernel,
    gaussian_affinity,
    knn_kernel,
    knn_mean,
)
from stac_rscbir.systems.ucnn import UnsupervisedCNN, cluster_ids, train_on_clusters


def test_gaussian_knn_affinity_on_three_points() -> None:
    """Points 0, 1, 3 on a line, k = 2 (a point counts itself), mu = 0.5.

    m = mean of the 2 smallest distances: m0 = (0 + 1)/2, m1 = (0 + 1)/2, m2 = (0 + 2)/2 = 1.
    eps01 = (.5 + .5 + 1)/3 = 2/3  -> W01 = exp(-1 / (.5 * 2/3)) = exp(-3)
    eps02 = (.5 + 1 + 3)/3 = 1.5   -> W02 = exp(-9 / .75)      = exp(-12)
    eps12 = (.5 + 1 + 2)/3 = 7/6   -> W12 = exp(-4 / (7/12))   = exp(-48/7);  W_ii = 1.
    S keeps each row's 2 largest: row 0 {0, 1}, row 1 {1, 0}, row 2 {2, 1}, normalised to sum 1.
    """
    x = np.array([[0.0], [1.0], [3.0]])
    dist = np.abs(x - x.T)
    m = knn_mean(dist, 2)
    np.testing.assert_allclose(m, [0.5, 0.5, 1.0])
    w = gaussian_affinity(dist, m, m, 0.5)
    a, b, c = exp(-3), exp(-12), exp(-48 / 7)
    np.testing.assert_allclose(w, [[1, a, b], [a, 1, c], [b, c, 1]], rtol=1e-12)
    s = knn_kernel(w, 2).toarray()
    expected_s = [[1 / (1 + a), a / (1 + a), 0], [a / (1 + a), 1 / (1 + a), 0]]
    expected_s.append([0, c / (1 + c), 1 / (1 + c)])
    np.testing.assert_allclose(s, expected_s, rtol=1e-12)
    p = np.array(
        [
            [0.5, a / (2 * (a + b)), b / (2 * (a + b))],
            [a / (2 * (a + c)), 0.5, c / (2 * (a + c))],
            [b / (2 * (b + c)), c / (2 * (b + c)), 0.5],
        ]
    )
    np.testing.assert_allclose(full_kernel(w), (p + p.T) / 2, rtol=1e-12)


def test_one_cross_diffusion_step_by_hand() -> None:
    """Two graphs. S1 averages nodes 0 and 1; S2 = I.

    S1 P2 rows: [.375, .375, .25] (nodes 0, 1), [.25, .25, .5] (node 2); times S1^T: the same.
    Normalised (off-diagonal over twice its sum, 1/2 on the diagonal): [.5, .3, .2],
    [.3, .5, .2], [.25, .25, .5]; symmetrised: the 0-2 entries become (.2 + .25)/2 = .225.
    P2' = norm(P1): rows [.5, .4, .1], [.4, .5, .1], [.25, .25, .5]; symmetrised .175.
    """
    s1 = sparse.csr_matrix([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    s2 = sparse.identity(3, format="csr")
    p1 = np.array([[0.5, 0.4, 0.1], [0.4, 0.5, 0.1], [0.1, 0.1, 0.5]])
    p2 = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    new1, new2 = cross_diffusion_step([s1, s2], [p1, p2])
    np.testing.assert_allclose(new1, [[0.5, 0.3, 0.225], [0.3, 0.5, 0.225], [0.225, 0.225, 0.5]])
    np.testing.assert_allclose(new2, [[0.5, 0.4, 0.175], [0.4, 0.5, 0.175], [0.175, 0.175, 0.5]])


def test_fused_distance_ranks_by_the_fused_graph() -> None:
    """Two descriptors of 4 images in two pairs {0, 1}, {2, 3}: each image's nearest other image
    is its pair; an archive image's query row is one more diffusion step of the graph."""
    db = np.array([[0.0, 0.0], [0.2, 0.1], [2.0, 3.0], [2.1, 3.2]])
    distance = CollaborativeAffinityDistance(dims=(1, 1), k=2, iterations=1)
    d = distance(db, db)
    np.fill_diagonal(d, np.inf)
    assert d.argmin(axis=1).tolist() == [1, 0, 3, 2]
    graphs, diffused = distance._graphs, distance._diffused
    step = [
        (g.local @ (g.local @ diffused[1 - v]).T).T for v, g in enumerate(graphs)
    ]  # m = 2: the other graph is the mean of the others
    np.testing.assert_allclose(distance(db, db), 1 - (step[0] + step[1]) / 2, rtol=1e-12)
    with pytest.raises(ValueError, match="2 columns"):
        distance(db[:, :1], db[:, :1])


def _blobs(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, 16))
    truth = np.repeat(np.arange(3), 20)
    x = centres[truth] + rng.normal(0, 0.3, (60, 16))
    return torch.from_numpy(x.astype(np.float32)), truth


def test_kmeans_pseudo_label_training_reduces_cross_entropy() -> None:
    """k-means finds the 3 blobs (one id per blob); CE on those ids falls while training."""
    x, truth = _blobs()
    ids = cluster_ids(x.numpy(), 3, seed=0)
    assert len({(t, i) for t, i in zip(truth, ids, strict=True)}) == 3
    torch.manual_seed(0)
    embed = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    history = train_on_clusters(
        embed, nn.Linear(8, 3), x, torch.from_numpy(ids), epochs=10, batch_size=16, lr=1e-2
    )
    assert len(history) == 10 and history[-1] < 0.5 * history[0], history


def test_ucnn_rounds_give_unit_descriptors_that_keep_the_blobs() -> None:
    x, truth = _blobs(1)
    model = UnsupervisedCNN(clusters=3, dim=8, hidden=16, rounds=2, epochs=10, pretrained=False)
    model.fit_features(x)
    assert len(model.losses) == 2 and all(r[-1] < r[0] for r in model.losses)
    z = model.embed_features(x)
    assert z.shape == (60, 8)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    dist = np.linalg.norm(z[:, None] - z[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    assert (truth[dist.argmin(axis=1)] == truth).all()


class _Stat:
    """A fixed toy descriptor: each band's mean (``which="mean"``) or max."""

    def __init__(self, which: str) -> None:
        self.which = which

    def fit(self, images: Images, labels: np.ndarray | None = None) -> _Stat:
        return self

    def transform(self, images: Images) -> np.ndarray:
        reduce = np.mean if self.which == "mean" else np.max
        return np.stack([reduce(im, axis=(0, 1)) for im in images]).astype(np.float32)


def test_fusion_rows_are_the_parts_cached_rows_side_by_side(tmp_path: Path) -> None:
    """The cache computes each part as its own method (a second fusion reads them back) and gives
    what the fusion's own fit/transform gives on the same pixels."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(paths[-1])
    data = LabelledImages(tmp_path, paths, np.array([0, 0, 1, 1]), ["a", "b"])
    parts = tuple(
        DescriptorSpec(f"toy-{w}", "toy", lambda w=w: _Stat(w), 8, learns=False, any_bands=True)
        for w in ("mean", "max")
    )
    fused = DescriptorSpec("toy-fused", "toy", FusedDescriptors, 8, True, True, parts=parts)
    rows, _ = cached_descriptors(data, fused, [0, 2], tmp_path / "cache", progress=False)
    assert rows.shape == (4, 6)
    saved = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").glob("*.npy"))
    assert saved == ["descriptor-toy-max-8", "descriptor-toy-mean-8"]  # the parts, not the fusion
    assert cached_descriptors(data, fused, [0, 2], tmp_path / "cache", progress=False)[1] == 0.0
    images = [np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in paths]
    direct = FusedDescriptors(parts).fit(images).transform(images)
    np.testing.assert_allclose(rows, direct, rtol=1e-6)


def test_registered_with_the_split_of_their_parts() -> None:
    assert DESCRIPTORS["ucnn"].distance is None and DESCRIPTORS["ucnn"].learns
    camf = DESCRIPTORS["ucnn-camf"]
    assert [p.name for p in camf.parts] == ["ucnn", "sift-bovw", "lbp"]
    assert DIMS == (256, 500, 162) and isinstance(camf.distance, CollaborativeAffinityDistance)
