"""[18] cnn-wd and [16] mlcnn: the weighted distance and the pooling on hand-computed cases, and
fit/transform of both systems on random 64 px images (randomly initialised backbones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.eval.retrieval_bench import BenchSetup, run
from stac_rscbir.systems.cnn_wd import CNNWeightedDistance, WeightedDistance
from stac_rscbir.systems.finetuned import FinetunedLite0, layer_index, rgb_tensor
from stac_rscbir.systems.mlcnn import MultiLayerCNN, aggregate, pool
from tests.test_descriptors import toy_folder  # noqa: F401 (the 3-class toy folder fixture)

# rows [f | p]: features in 2-D, probabilities of 2 classes
Q = [0.0, 0.0, 0.2, 0.8]  # predicted class 1
X1 = [1.0, 0.0, 0.7, 0.3]  # class 0, 1 from q
X2 = [2.0, 0.0, 0.4, 0.6]  # class 1, 2 from q


def test_weighted_distance_three_images() -> None:
    rows = np.array([Q, X1, X2])
    d = WeightedDistance(feature_dim=2, eps=0.0)(rows, rows)
    # D(a, b) = (1 - p_{c(b)}(a)) * ||f(a) - f(b)||
    expected = [
        [0.0, (1 - 0.2) * 1, (1 - 0.8) * 2],
        [(1 - 0.3) * 1, 0.0, (1 - 0.3) * 1],
        [(1 - 0.6) * 2, (1 - 0.4) * 1, 0.0],
    ]
    np.testing.assert_allclose(d, expected, atol=1e-12)
    # the weights reorder: X2 is twice as far as X1 in features but of q's likely class
    assert np.argsort(d[0, 1:]).tolist() == [1, 0]


def test_weighted_distance_eps_keeps_feature_order_and_checks_columns() -> None:
    q = np.array([[0.0, 0.0, 1.0, 0.0]])
    db = np.array([[1.0, 0.0, 1.0, 0.0], [2.0, 0.0, 1.0, 0.0]])
    d = WeightedDistance(feature_dim=2, eps=1e-6)(q, db)
    np.testing.assert_allclose(d, [[1e-6, 2e-6]])
    with pytest.raises(ValueError, match="class probabilities"):
        WeightedDistance(feature_dim=4)(q, db)


def test_pooling_on_a_tiny_map() -> None:
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [5.0, -2.0]]]])  # (1, 2, 2, 2)
    assert pool(x, "max", (2, 3)).tolist() == [[4.0, 5.0]]
    assert pool(x, "avg", (2, 3)).tolist() == [[2.5, 0.5]]
    assert pool(x, "sum", (2, 3)).tolist() == [[10.0, 2.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool(x, "median", (2, 3))


def test_aggregate_scales_and_layers() -> None:
    # max over space gives (3, 4) at scale 1 and (0, 2) at scale 2: L2 -> (.6, .8), (0, 1)
    s1 = {"a": torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])}
    s2 = {"a": torch.tensor([[[[0.0, -1.0]], [[2.0, 0.0]]]])}
    concat = aggregate([s1, s2], ["a"], "max", "concat")
    np.testing.assert_allclose(concat, [[0.6, 0.8, 0.0, 1.0]], atol=1e-6)
    summed = aggregate([s1, s2], ["a"], "max", "sum")
    np.testing.assert_allclose(summed, [np.array([0.6, 1.8]) / np.hypot(0.6, 1.8)], atol=1e-6)
    maxed = aggregate([s1, s2], ["a"], "max", "max")
    np.testing.assert_allclose(maxed, [np.array([0.6, 1.0]) / np.hypot(0.6, 1.0)], atol=1e-6)
    # two layers are concatenated, each unit-norm
    two = aggregate([{**s1, "b": s1["a"]}], ["a", "b"], "avg", "concat")
    np.testing.assert_allclose(np.linalg.norm(two.reshape(2, 2), axis=1), [1.0, 1.0], atol=1e-6)


def _images(n: int = 10, size: int = 64) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((size, size, 3), dtype=np.float32) for _ in range(n)]


def test_cnn_wd_fit_transform_rows() -> None:
    images, labels = _images(), np.arange(10) % 3
    rows = CNNWeightedDistance(size=64, epochs=1, pretrained=False).fit(images, labels)
    x = rows.transform(images)
    assert x.shape == (10, 512 + 3) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:, :512], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(x[:, 512:].sum(axis=1), 1.0, atol=1e-5)
    assert DESCRIPTORS["cnn-wd"].distance is not None and DESCRIPTORS["cnn-wd"].learns


def test_mlcnn_fit_transform_and_memo() -> None:
    images, labels = _images(), np.arange(10) % 2
    system = MultiLayerCNN(
        sizes=(64, 48),
        layers=("b11", "head"),
        spatial="max",
        scales="concat",
        epochs=1,
        pretrained=False,
    ).fit(images, labels)
    x = system.transform(images)
    assert x.shape == (10, 2 * (112 + 1280))
    system.network._memo.clear()  # a remembered front equals a recomputed one
    np.testing.assert_allclose(system.transform(images), x, atol=1e-6)
    assert DESCRIPTORS["mlcnn"].learns and not DESCRIPTORS["mlcnn"].any_bands


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="RGB"):
        rgb_tensor([np.zeros((8, 8, 12), np.float32)], 8)
    with pytest.raises(ValueError, match="layer"):
        layer_index("fc7")
    with pytest.raises(ValueError, match="spatial pooling"):
        MultiLayerCNN(spatial="median", pretrained=False)
    with pytest.raises(ValueError, match="convolutional maps"):
        MultiLayerCNN(layers=("fc",), pretrained=False)
    with pytest.raises(ValueError, match="one label per image"):
        FinetunedLite0(sizes=(64,), pretrained=False).fit(_images(2), None)  # type: ignore[arg-type]


def test_cnn_wd_row_through_the_benchmark(toy_folder: BenchSetup) -> None:  # noqa: F811
    """The registered SPEC (ImageNet weights) ranks the toy classes by its weighted distance."""
    result = run(toy_folder, "cnn-wd", bits=8)
    assert result["bits"] is None and result["descriptor_dim"] == 512 + 3
    assert result["map_at_20"] > 0.8, result["map_at_20"]
