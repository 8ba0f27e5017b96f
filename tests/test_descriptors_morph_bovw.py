"""[2] morphological pattern spectra and [1] SIFT bag of visual words on hand-computed cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from skimage.morphology import area_closing, area_opening

from stac_rscbir.descriptors.bovw import SiftBoVW, inverse_document_frequency, tfidf
from stac_rscbir.descriptors.morphology import PatternSpectrum, opening_spectrum
from stac_rscbir.descriptors.registry import DESCRIPTORS


def two_squares() -> np.ndarray:
    """9x9 dark image with a bright single pixel (area 1) and a bright 3x3 square (area 9)."""
    image = np.zeros((9, 9), np.uint8)
    image[1, 1] = 200
    image[4:7, 4:7] = 200
    return image


def test_pattern_spectrum_puts_each_square_in_its_area_bin() -> None:
    # Edges 2, 4, 8, 16 -> bins [1,2), [2,4), [4,8), [8,16), [16,inf). Removed volumes: the pixel
    # 1 * 200 in bin 0, the square 9 * 200 in bin 3; divided by sum(f - min f) = 10 * 200.
    edges = np.array([2, 4, 8, 16])
    np.testing.assert_allclose(opening_spectrum(two_squares(), edges), [0.1, 0, 0, 0.9, 0])
    # The closings see one dark component (the background, area 71 >= 16): the last bin only.
    np.testing.assert_allclose(opening_spectrum(255 - two_squares(), edges), [0, 0, 0, 0, 1])


def test_pattern_spectrum_equals_the_differences_of_area_openings_and_closings() -> None:
    image = np.random.default_rng(0).integers(0, 6, (12, 12)).astype(np.uint8)
    edges = np.array([2, 4, 8, 16, 32])
    volume = float((image - image.min()).sum())
    opened = [image.astype(float)] + [area_opening(image, int(e)).astype(float) for e in edges]
    expected = [(a.sum() - b.sum()) / volume for a, b in itertools.pairwise(opened)]
    expected.append(opened[-1].sum() / volume - image.min() * image.size / volume)
    np.testing.assert_allclose(opening_spectrum(image, edges), expected)
    negative_volume = float((image.max() - image).sum())
    closed = [image.astype(float)] + [area_closing(image, int(e)).astype(float) for e in edges]
    closing = [(b.sum() - a.sum()) / negative_volume for a, b in itertools.pairwise(closed)]
    np.testing.assert_allclose(opening_spectrum(image.max() - image, edges)[:-1], closing)


def test_pattern_spectrum_descriptor_shape_and_flat_image() -> None:
    descriptor = PatternSpectrum(scales=4)
    squares = np.repeat(two_squares()[..., None], 12, 2) / 255.0  # any bands: the grey view
    images = [np.zeros((9, 9, 3), np.float32), squares.astype(np.float32)]
    out = descriptor.fit(images).transform(images)
    assert out.shape == (2, 10) and out.dtype == np.float32
    assert not out[0].any()  # flat: nothing to remove
    np.testing.assert_allclose(out[1].reshape(2, 5).sum(axis=1), [1, 1], rtol=1e-6)


def test_tfidf_matches_the_formula_on_a_hand_made_count_matrix() -> None:
    counts = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    idf = inverse_document_frequency(counts)
    # N = 4 images; word 0 in 2 images, word 1 in 1, word 2 in 2.
    np.testing.assert_allclose(idf, [np.log(2), np.log(4), np.log(2)])
    t = tfidf(counts, idf)
    row0 = np.array([2 / 3 * np.log(2), 0, 1 / 3 * np.log(2)])
    row1 = np.array([0, 3 / 4 * np.log(4), 1 / 4 * np.log(2)])
    np.testing.assert_allclose(t[0], row0 / np.linalg.norm(row0), rtol=1e-6)
    np.testing.assert_allclose(t[1], row1 / np.linalg.norm(row1), rtol=1e-6)
    np.testing.assert_allclose(t[2], [1, 0, 0], rtol=1e-6)
    assert not t[3].any()  # no words: stays zero


def texture(kind: str, seed: int, size: int = 64) -> np.ndarray:
    """Horizontal stripes or a checkerboard, with a random phase and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] + rng.integers(0, 8, 2)[:, None, None]
    base = (y // 4) % 2 if kind == "stripes" else ((x // 6) + (y // 6)) % 2
    image = 0.2 + 0.6 * base + 0.05 * rng.standard_normal((size, size))
    return np.repeat(np.clip(image, 0, 1).astype(np.float32)[..., None], 3, axis=2)


def test_bovw_pipeline_on_synthetic_textures() -> None:
    train = [texture(kind, seed) for kind in ("stripes", "checks") for seed in range(3)]
    bovw = SiftBoVW(words=8, step=8, patch=16, sample=2000).fit(train)
    queries = [texture("stripes", 10), texture("stripes", 11), texture("checks", 12)]
    out = bovw.transform(queries)
    assert out.shape == (3, 8) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, rtol=1e-5)
    assert np.linalg.norm(out[0] - out[1]) < np.linalg.norm(out[0] - out[2])
    counts = bovw.counts(queries)
    assert (counts >= 0).all() and (counts.sum(axis=1) == 64).all()  # an 8x8 grid of words


def test_dog_keypoints_leave_a_flat_image_without_words() -> None:
    train = [texture("checks", seed) for seed in range(3)]
    bovw = SiftBoVW(words=4, keypoints="dog", sample=2000).fit(train)
    flat = np.full((64, 64, 3), 0.5, np.float32)
    assert not bovw.counts([flat]).any() and not bovw.transform([flat]).any()
    with pytest.raises(ValueError, match="keypoints"):
        SiftBoVW(keypoints="harris")


def test_specs_are_registered() -> None:
    assert DESCRIPTORS["morph-ps"].learns is False
    assert DESCRIPTORS["sift-bovw"].learns is True and DESCRIPTORS["sift-bovw"].any_bands is False
