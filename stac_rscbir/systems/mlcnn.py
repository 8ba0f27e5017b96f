"""[16] Hu, Tong, Xia & Zhang 2016, "Delving into deep representations for remote sensing image
retrieval", IEEE International Conference on Signal Processing (ICSP), 198-203 (survey Table 1:
data augmentation, pre-trained weights, CNN, classification, cross-entropy).

A CNN initialised from ImageNet and fine-tuned with cross-entropy on the labelled images, fed
the images at several scales (multi-scale mini-batches); images are then described by the
convolutional feature maps of several layers at several input scales, each map pooled over
space, L2-normalised, and the pooled vectors aggregated:

    v_{l,s} = P(F_{l,s}) / ||P(F_{l,s})||_2,   P in {max, avg, sum} over the h x w positions
    (max: v_c = max_{ij} F_cij;  avg: v_c = (1/hw) sum_{ij} F_cij;  sum: v_c = sum_{ij} F_cij)

    d(x) = [ A_s(v_{l1,s}) | A_s(v_{l2,s}) | ... ],   A over scales: concatenation, or the
    element-wise sum / max of the scales' vectors, L2-normalised again

for layers l (``layers``: ``"b{k}"`` the input of EfficientNet-Lite0 block k, ``"b16"`` the last
block's output, ``"head"`` the 1280-channel head map) and input sizes s (``sizes``). After a
map's L2 normalisation sum and average pooling rank alike (they differ by the factor hw); sum
pooling differs where it aggregates vectors, across ``scales``. Assumed: the paper's own network,
layers and scales are not reproduced; here the CNN is EfficientNet-Lite0 with its last two
blocks and head convolution fine-tuned (:class:`~stac_rscbir.systems.finetuned.FinetunedLite0`;
block 11's input is in the frozen ImageNet front), and the
SPEC's setting is the best cheap one of a small AID ablation (``benchmarks/mlcnn_ablation.py``,
``benchmarks/results/aid/mlcnn-ablation.json``: 40 images per class): blocks 11 and 16 and the
head map, average pooling (max pooling scored 3-5 points lower), 150 and 128 px summed (about
one point above 150 px alone, 0.675 -> 0.684, for ~80 % more time; concatenation scored the
same at twice the dimension).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from stac_rscbir.descriptors.base import DescriptorSpec, Images
from stac_rscbir.systems.finetuned import FinetunedLite0

POOLINGS = ("max", "avg", "sum")


def pool(x: torch.Tensor, how: str, dims: tuple[int, ...]) -> torch.Tensor:
    """Max, average or sum of ``x`` over ``dims``."""
    if how == "max":
        return x.amax(dim=dims)
    if how == "avg":
        return x.mean(dim=dims)
    if how == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"unknown pooling {how!r}; choose from {', '.join(POOLINGS)}")


def aggregate(
    maps: Sequence[dict[str, torch.Tensor]], layers: Sequence[str], spatial: str, scales: str
) -> torch.Tensor:
    """(n, d) descriptors from per-scale named maps (n, C, h, w): each map pooled over space
    with ``spatial`` and L2-normalised, the scales of each layer concatenated (``"concat"``) or
    pooled element-wise (``"max"``, ``"avg"``, ``"sum"``) and L2-normalised, layers concatenated.
    """
    parts = []
    for layer in layers:
        vectors = [F.normalize(pool(m[layer], spatial, (2, 3)), dim=1) for m in maps]
        if scales == "concat":
            parts.extend(vectors)
        else:
            parts.append(F.normalize(pool(torch.stack(vectors, dim=2), scales, (2,)), dim=1))
    return torch.cat(parts, dim=1)


class MultiLayerCNN:
    """Multi-scale, multi-layer pooled maps of a CE-fine-tuned EfficientNet-Lite0."""

    def __init__(
        self,
        sizes: Sequence[int] = (150, 128),
        layers: Sequence[str] = ("b11", "b16", "head"),
        spatial: str = "avg",
        scales: str = "sum",
        epochs: int = 3,
        seed: int = 0,
        pretrained: bool = True,
    ) -> None:
        if spatial not in POOLINGS or scales not in (*POOLINGS, "concat"):
            raise ValueError(
                f"spatial pooling is one of {POOLINGS} and scales one of {(*POOLINGS, 'concat')},"
                f" got {spatial!r} and {scales!r}"
            )
        if "fc" in layers:
            raise ValueError("mlcnn pools convolutional maps; 'fc' is not one")
        self.layers, self.spatial, self.scales = tuple(layers), spatial, scales
        self.network = FinetunedLite0(
            sizes=sizes, layers=layers, epochs=epochs, seed=seed, pretrained=pretrained
        )

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> MultiLayerCNN:
        """Fine-tune with cross-entropy on the labelled training images, every size."""
        self.network.fit(images, labels)
        return self

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, d) aggregated descriptors."""
        maps = self.network.maps(images)
        return aggregate(maps, self.layers, self.spatial, self.scales).numpy().astype(np.float32)


SPEC = DescriptorSpec(
    name="mlcnn",
    reference="[16] Hu et al. 2016, multi-scale multi-layer pooled CNN maps, fine-tuned with CE",
    factory=MultiLayerCNN,
    input_size=150,
    learns=True,
    supervised=True,
    any_bands=False,
)
