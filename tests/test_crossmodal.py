"""Cross-modal S2/S1 hashing on BigEarthNet v1 pairs: one branch per sensor, one Hamming space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stac_rscbir.data.bigearthnet import BandStats, BenPatches, load_ben_v1
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.methods import METHODS, HashingNet
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

from .conftest import require

BEN_V1 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bigearthnet" / "BENv1"
BITS = 32


@pytest.fixture(scope="module")
def pairs() -> tuple[BenPatches, BenPatches]:
    require(BEN_V1.exists(), f"BigEarthNet v1 patches not found at {BEN_V1}")
    return load_ben_v1(BEN_V1, "s2"), load_ben_v1(BEN_V1, "s1")


def _train(s2: torch.Tensor, s1: torch.Tensor, labels: np.ndarray, iterations: int) -> HashingNet:
    """The two-branch sidhcnn net (S2 = source 0, S1 = source 1), same seeded initialisation."""
    torch.manual_seed(0)
    return train_hashing(
        METHODS["sidhcnn"],
        s2,
        labels,
        BITS,
        TrainConfig(iterations=iterations, batch_size=16, seed=0, device="cpu", progress=False),
        second_source=s1,
        backbone=build_backbone("smallcnn", s2.shape[1]),
        backbone2=build_backbone("smallcnn", s1.shape[1]),
    ).net


def _cross(net: HashingNet, s2: torch.Tensor, s1: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, N) Hamming distances and cosine similarities of the relaxed codes between S2 codes
    (rows) and S1 codes (columns)."""
    b2, h2 = encode(net, s2, source=0)
    b1, h1 = encode(net, s1, source=1)
    assert b2.shape == b1.shape == h2.shape == h1.shape == (len(s2), BITS)
    assert b2.dtype == b1.dtype == np.uint8 and set(np.unique(np.r_[b2, b1])) <= {0, 1}
    h2 = h2 / np.linalg.norm(h2, axis=1, keepdims=True)
    h1 = h1 / np.linalg.norm(h1, axis=1, keepdims=True)
    return (b2[:, None, :] != b1[None, :, :]).sum(-1).astype(np.float64), h2 @ h1.T


@pytest.mark.shared
def test_training_pulls_paired_s2_s1_codes_together(pairs: tuple[BenPatches, BenPatches]) -> None:
    s2, s1 = pairs
    assert s2.names == s1.names and np.array_equal(s2.labels, s1.labels)  # co-registered rows
    x2 = torch.from_numpy(BandStats.fit(s2.images, s2.bands).normalise(s2.images))
    x1 = torch.from_numpy(BandStats.fit(s1.images, s1.bands).normalise(s1.images))
    assert x2.shape[1] == 12 and x1.shape[1] == 2

    off = ~np.eye(len(s2), dtype=bool)
    ham0, cos0 = _cross(_train(x2, x1, s2.labels, 0), x2, x1)
    ham, cos = _cross(_train(x2, x1, s2.labels, 40), x2, x1)
    for d in (ham0, ham):
        assert np.isfinite(d).all() and d.min() >= 0 and d.max() <= BITS
    assert np.isfinite(cos0).all() and np.isfinite(cos).all()
    # untrained branches are unrelated: a patch's S1 code is no closer to its S2 code than the
    # other patches' S1 codes are (measured: gap -0.1 bits)
    assert abs(ham0[off].mean() - np.diag(ham0).mean()) < 1.0
    # after training the same patch seen by the two sensors is closer in the shared Hamming
    # space than other patches are (measured: 3.1 bits of 32) ...
    assert ham[off].mean() - np.diag(ham).mean() > 2.0
    # ... and its relaxed S2 and S1 codes point more alike than before (cosine 0.10 -> 0.24)
    assert np.diag(cos).mean() > np.diag(cos0).mean() + 0.08
