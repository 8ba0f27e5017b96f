"""[18] Ye, Xiao, Zhao, Dong, Luo & Min 2018, "Remote sensing image retrieval using convolutional
neural network features and weighted distance", IEEE Geoscience and Remote Sensing Letters
15(10), 1535-1539 (survey Table 1: random selection, pre-trained weights, CNN, classification,
cross-entropy).

Offline, a pre-trained CNN is fine-tuned with cross-entropy on the labelled training images; it
gives every image x a feature vector f(x) and class probabilities p(x) (softmax of its logits),
and labels each archive image with its predicted class c(x) = argmax_c p_c(x). Online, the query
q's probabilities weight the distance to each archive image by how likely the query is to belong
to that image's predicted class:

    D(q, x) = w_q(c(x)) * ||f(q) - f(x)||_2,    w_q(c) = 1 - p_c(q) + eps

so images of the classes the query most probably shows come first, and the feature distance
orders images within a class (``eps`` = 1e-6 keeps that order where p_c(q) rounds to 1).
Assumed: the weight form ``1 - p``, the paper's decreasing function of the query's class
probability as we recall it; the features f are the fine-tuned network's fully connected
hidden layer (512 units after ReLU, on the pooled head map, as the paper takes a fully connected
layer of its CNN), L2-normalised.

Cheap CPU training (:class:`~stac_rscbir.systems.finetuned.FinetunedLite0`): ImageNet
EfficientNet-Lite0 at 150 px; the classifier (1280 -> 512 -> K) first trains on the frozen
network's pooled maps, then the last two blocks, the head convolution and the classifier
together for 3 epochs. The descriptor row is ``[f(x) | p(x)]`` (512 + K columns); the SPEC's
:data:`weighted_distance` splits it at 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from stac_rscbir.descriptors.base import DescriptorSpec, Images
from stac_rscbir.systems.finetuned import FinetunedLite0

FEATURE_DIM = 512
EPS = 1e-6


@dataclass(frozen=True)
class WeightedDistance:
    """[18]'s D(q, x) = (1 - p_{c(x)}(q) + eps) ||f(q) - f(x)||_2 between rows ``[f | p]``
    whose first ``feature_dim`` columns are the features."""

    feature_dim: int = FEATURE_DIM
    eps: float = EPS

    def __call__(
        self, queries: npt.NDArray[np.float64], database: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        """(Q, N) weighted distances."""
        fq, pq = queries[:, : self.feature_dim], queries[:, self.feature_dim :]
        fx, px = database[:, : self.feature_dim], database[:, self.feature_dim :]
        if pq.shape[1] == 0 or pq.shape[1] != px.shape[1]:
            raise ValueError(
                f"rows must be {self.feature_dim} features then class probabilities, "
                f"got {queries.shape[1]} and {database.shape[1]} columns"
            )
        sq = (fq**2).sum(1)[:, None] + (fx**2).sum(1)[None, :] - 2.0 * fq @ fx.T
        features = np.sqrt(np.maximum(sq, 0.0))
        weights = 1.0 - pq[:, px.argmax(axis=1)] + self.eps
        return weights * features


weighted_distance = WeightedDistance()


class CNNWeightedDistance:
    """Fine-tuned CNN features and class probabilities, rows ``[f(x) | p(x)]``."""

    def __init__(self, size: int = 150, epochs: int = 3, seed: int = 0, pretrained: bool = True):
        self.network = FinetunedLite0(
            sizes=(size,),
            layers=("fc",),
            hidden=FEATURE_DIM,
            epochs=epochs,
            seed=seed,
            pretrained=pretrained,
        )

    def fit(
        self, images: Images, labels: npt.NDArray[np.int64] | None = None
    ) -> CNNWeightedDistance:
        """Fine-tune on the labelled training images (labels are required)."""
        self.network.fit(images, labels)
        return self

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, 512 + K) rows: L2-normalised fc features, then softmax probabilities."""
        (maps,) = self.network.maps(images)
        features = torch.nn.functional.normalize(maps["fc"], dim=1)
        probabilities = maps["logits"].softmax(dim=1)
        return torch.cat([features, probabilities], dim=1).numpy().astype(np.float32)


SPEC = DescriptorSpec(
    name="cnn-wd",
    reference="[18] Ye et al. 2018, CNN features and a class-probability weighted distance",
    factory=CNNWeightedDistance,
    input_size=150,
    learns=True,
    supervised=True,
    any_bands=False,
    distance=weighted_distance,
)
