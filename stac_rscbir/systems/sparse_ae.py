"""[13] Zhou, Shao, Diao & Cheng 2015, "High-resolution remote-sensing imagery retrieval using
sparse features by auto-encoder", Remote Sensing Letters 6(10), pp. 775-783: an auto-encoder
learns sparse features from SIFT descriptors without labels; pooled, they describe the image.

Table 1 of the survey: random mini-batches, random initialisation, an auto-encoder, a
reconstruction loss (unsupervised). Implemented:

* Local descriptors: dense SIFT, from :meth:`SiftBoVW.local_descriptors
  <stac_rscbir.descriptors.bovw.SiftBoVW.local_descriptors>` (a 128-d descriptor every 16 px of
  the 256 px image), standardised per dimension with the training sample's mean and deviation.
* One hidden layer of ``hidden`` sigmoid units and a linear decoder (:class:`SparseAutoencoder`):

      h = sigmoid(W1 x + b1),   x_hat = W2 h + b2

* The sparse auto-encoder's objective (Ng's sparse auto-encoder notes, the formulation the
  paper builds on), over a mini-batch of m descriptors:

      J = 1/(2m) sum_i ||x_hat_i - x_i||^2  +  lambda/2 (||W1||^2 + ||W2||^2)
          + beta sum_j KL(rho || rho_hat_j)

  with rho_hat_j = (1/m) sum_i h_j(x_i) the mean activation of hidden unit j and
  KL(rho || rho_hat) = rho log(rho / rho_hat) + (1 - rho) log((1 - rho) / (1 - rho_hat))
  (:func:`kl_sparsity`), which keeps each unit off for most descriptors: the sparse features.
* The image feature: the hidden activations of its descriptors pooled over the image
  (``pool="mean"``, the default, or ``"max"``).

Assumed where the letter's settings are not recalled: the linear decoder on standardised SIFT
(the sigmoid decoder of the notes needs inputs in [0, 1]), rho = 0.05, beta = 3,
lambda = 1e-4, 256 hidden units, Adam with mini-batches of 256 for 15 epochs on 100 000
descriptors sampled evenly from the training images, and mean pooling (on a 600-image AID
subset, 20 per class, mean and max pooling gave the same mAP@20, 0.278; 512 units or beta = 0.5
moved it by less than 0.01). Images are ranked by the Euclidean distance between pooled
features.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from stac_rscbir.descriptors.base import DescriptorSpec, Images
from stac_rscbir.descriptors.bovw import SiftBoVW


def kl_sparsity(activations: torch.Tensor, rho: float) -> torch.Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j the mean over rows of hidden unit j's activation
    (clamped away from 0 and 1 so that dead or saturated units give a finite penalty)."""
    rho_hat = activations.mean(dim=0).clamp(1e-6, 1.0 - 1e-6)
    return (
        rho * torch.log(rho / rho_hat) + (1.0 - rho) * torch.log((1.0 - rho) / (1.0 - rho_hat))
    ).sum()


class SparseAutoencoder(nn.Module):
    """One sigmoid hidden layer, a linear decoder (the module docstring's h and x_hat)."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Linear(inputs, hidden)
        self.decoder = nn.Linear(hidden, inputs)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """h = sigmoid(W1 x + b1), (m, hidden)."""
        return torch.sigmoid(self.encoder(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat, h)."""
        h = self.encode(x)
        return self.decoder(h), h

    def loss(self, x: torch.Tensor, rho: float, beta: float, weight_decay: float) -> torch.Tensor:
        """J of the module docstring on the mini-batch ``x``."""
        x_hat, h = self(x)
        reconstruction = 0.5 * (x_hat - x).pow(2).sum(dim=1).mean()
        decay = (
            0.5
            * weight_decay
            * (self.encoder.weight.pow(2).sum() + self.decoder.weight.pow(2).sum())
        )
        return reconstruction + decay + beta * kl_sparsity(h, rho)


class SiftSparseAE:
    """Dense SIFT -> sparse auto-encoder features -> pooled image feature (a Descriptor)."""

    def __init__(
        self,
        hidden: int = 256,
        rho: float = 0.05,
        beta: float = 3.0,
        weight_decay: float = 1e-4,
        pool: str = "mean",
        sample: int = 100_000,
        epochs: int = 15,
        batch: int = 256,
        lr: float = 1e-3,
        step: int = 16,
        patch: int = 16,
        seed: int = 0,
    ) -> None:
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', not {pool!r}")
        self.hidden, self.rho, self.beta, self.weight_decay = hidden, rho, beta, weight_decay
        self.pool, self.sample, self.epochs, self.batch, self.lr = pool, sample, epochs, batch, lr
        self.seed = seed
        self._sift = SiftBoVW(step=step, patch=patch)
        self.net: SparseAutoencoder | None = None
        self.mean: npt.NDArray[np.float32] | None = None
        self.std: npt.NDArray[np.float32] | None = None

    def _standardise(self, desc: npt.NDArray[np.float32]) -> torch.Tensor:
        assert self.mean is not None and self.std is not None
        return torch.from_numpy((desc - self.mean) / self.std)

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> SiftSparseAE:
        """Train the auto-encoder on up to ``sample`` SIFT descriptors drawn evenly over the
        training images (labels unused: the method is unsupervised)."""
        rng = np.random.default_rng(self.seed)
        per_image = max(1, -(-self.sample // max(len(images), 1)))
        drawn = []
        for image in images:
            desc = self._sift.local_descriptors(image)
            if len(desc) > per_image:
                desc = desc[rng.choice(len(desc), per_image, replace=False)]
            drawn.append(desc)
        pool = np.concatenate(drawn)
        if len(pool) == 0:
            raise ValueError("the training images gave no SIFT descriptors to learn from")
        self.mean = pool.mean(axis=0)
        self.std = np.maximum(pool.std(axis=0), 1e-6).astype(np.float32)
        x = self._standardise(pool)
        torch.manual_seed(self.seed)
        self.net = SparseAutoencoder(x.shape[1], self.hidden)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        order = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            for rows in torch.randperm(len(x), generator=order).split(self.batch):
                optimiser.zero_grad()
                self.net.loss(x[rows], self.rho, self.beta, self.weight_decay).backward()
                optimiser.step()
        self.net.eval()
        return self

    @torch.no_grad()
    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, hidden) float32: each image's pooled hidden activations."""
        if self.net is None:
            raise RuntimeError("SiftSparseAE.fit must run before describing images")
        out = np.zeros((len(images), self.hidden), np.float32)
        for i, image in enumerate(images):
            desc = self._sift.local_descriptors(image)
            if len(desc) == 0:
                continue  # no descriptor, no activation: the zero feature
            h = self.net.encode(self._standardise(desc))
            out[i] = (h.mean(dim=0) if self.pool == "mean" else h.amax(dim=0)).numpy()
        return out


SPEC = DescriptorSpec(
    name="sift-sae",
    reference=(
        "[13] Zhou, Shao, Diao & Cheng 2015, sparse auto-encoder (KL sparsity) features of "
        "dense SIFT, mean-pooled per image"
    ),
    factory=SiftSparseAE,
    input_size=256,
    learns=True,
    any_bands=False,
)
