"""The ImageNet EfficientNet-Lite0 with its last blocks fine-tuned by cross-entropy on the
training labels: the "pre-trained network weights, classification (supervised), cross-entropy"
learning strategy that Table 1 of the survey gives [16], [17], [18] and [20], made cheap on CPU.

The front (stem and blocks ``[0, train_from)``) stays frozen and runs once per image and input
size; its outputs are remembered by pixel content during :meth:`FinetunedLite0.fit`, since the
benchmark describes the training images again after fitting and the frozen pass is the dominant
cost (about 20 images/s at 150 px on one core). Training follows what ``models.finetune``
measured on AID: the classifier on the average-pooled head map (linear, or with one hidden
layer, ``hidden``) first trains alone on the frozen network (the probe), then the tail (blocks
``[train_from, 16)``, the head convolution) and the classifier train together with
cross-entropy, Adam (classifier lr 1e-3, tail 1e-4), the BatchNorm statistics kept at ImageNet's
(eval mode throughout: no drift on small batches, no stochastic depth), each mini-batch
augmented by a random dihedral transform of the front maps.

Several input sizes train one network: every epoch visits each image at each size, mini-batches
of one size in random order (the multi-scale mini-batches of [16]). :meth:`FinetunedLite0.maps`
gives, per size, the named maps the systems pool: ``"b{k}"`` is the input of block k (``"b16"``
the last block's output), ``"head"`` the 1280-channel head map, ``"fc"`` the classifier's hidden
layer, plus the ``"logits"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from stac_rscbir.descriptors.base import Images
from stac_rscbir.models.augment import dihedral
from stac_rscbir.models.backbones import EfficientNetLite0, imagenet_normalize

N_BLOCKS = 16


def rgb_tensor(images: Images, size: int) -> torch.Tensor:
    """(n, 3, size, size) ImageNet-normalised batch of (H, W, 3) images in [0, 1], resized
    (bilinear, antialiased) where their size differs."""
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"the CNN systems take RGB (H, W, 3) images, got {image.shape}")
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images]))
    x = x.permute(0, 3, 1, 2)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return imagenet_normalize(x)


def layer_index(name: str) -> int:
    """Block index of a tap name ``"b{k}"`` (0-16); 16 for ``"head"`` and ``"fc"``."""
    if name in ("head", "fc"):
        return N_BLOCKS
    if name.startswith("b") and name[1:].isdigit() and 0 <= int(name[1:]) <= N_BLOCKS:
        return int(name[1:])
    raise ValueError(f"unknown layer {name!r}: use 'b0'..'b{N_BLOCKS}', 'head' or 'fc'")


class FinetunedLite0:
    """EfficientNet-Lite0, blocks ``[train_from, 16)`` and the head fine-tuned with CE."""

    def __init__(
        self,
        sizes: Sequence[int] = (150,),
        layers: Sequence[str] = ("head",),
        train_from: int = 14,
        hidden: int | None = None,
        probe_steps: int = 1000,
        epochs: int = 3,
        lr: float = 1e-3,
        backbone_lr: float = 1e-4,
        batch_size: int = 64,
        seed: int = 0,
        pretrained: bool = True,
    ) -> None:
        if not sizes or min(sizes) < 32:
            raise ValueError(f"sizes must be input sizes of at least 32 px, got {sizes}")
        if not 0 <= train_from <= N_BLOCKS:
            raise ValueError(f"train_from must be in [0, {N_BLOCKS}], got {train_from}")
        for name in layers:
            layer_index(name)
        self.sizes, self.layers, self.train_from = tuple(sizes), tuple(layers), train_from
        self.hidden, self.probe_steps = hidden, probe_steps
        self.epochs, self.lr, self.backbone_lr = epochs, lr, backbone_lr
        self.batch_size, self.seed = batch_size, seed
        torch.manual_seed(seed)
        self.net = EfficientNetLite0(3, pretrained=pretrained).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.classifier: nn.Sequential | None = None
        self._front_taps = sorted(
            {layer_index(n) for n in self.layers if n not in ("head", "fc")}
            & set(range(train_from))
        )
        self._memo: dict[bytes, list[list[torch.Tensor]]] = {}

    # -- the frozen front ------------------------------------------------------------------

    def _front(self, images: Images, remember: bool) -> list[list[torch.Tensor]]:
        """Per size, [front taps..., front output] for ``images`` (float16, memoised by
        content: a hit equals a recomputation, both pass through float16). Each image is read
        once (a training set may be files read on access)."""
        per_image: list[list[list[torch.Tensor]]] = []
        for begin in range(0, len(images), 32):
            batch = [images[i] for i in range(begin, min(begin + 32, len(images)))]
            keys = [hashlib.blake2b(np.ascontiguousarray(im).tobytes()).digest() for im in batch]
            todo = [j for j, k in enumerate(keys) if k not in self._memo]
            fresh: dict[int, list[list[torch.Tensor]]] = {j: [] for j in todo}
            for size in self.sizes if todo else ():
                outs = self._run_front(rgb_tensor([batch[j] for j in todo], size))
                for row, j in enumerate(todo):
                    fresh[j].append([t[row].clone() for t in outs])
            if remember:
                self._memo.update((keys[j], fresh[j]) for j in todo)
            per_image += [
                self._memo[k] if k in self._memo else fresh[j] for j, k in enumerate(keys)
            ]
        return [
            [torch.stack([p[s][t] for p in per_image]) for t in range(len(per_image[0][s]))]
            for s in range(len(self.sizes))
        ]

    def _run_front(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen stem and blocks ``[0, train_from)`` of a normalised batch: the taps among
        them, then their output, float16."""
        net = self.net.net
        with torch.inference_mode():
            a = net._swish(net._bn0(net._conv_stem(x)))
            taps = []
            for idx in range(self.train_from):
                if idx in self._front_taps:
                    taps.append(a)
                a = net._blocks[idx](a)
            return [t.to(torch.float16) for t in (*taps, a)]

    # -- the trained tail ------------------------------------------------------------------

    def _tail(self, a: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tail maps of front output ``a``: ``"b{k}"`` for k >= train_from and ``"head"``."""
        net = self.net.net
        taps: dict[str, torch.Tensor] = {}
        a = a.float()
        for idx in range(self.train_from, N_BLOCKS):
            taps[f"b{idx}"] = a
            a = net._blocks[idx](a)
        taps[f"b{N_BLOCKS}"] = a
        taps["head"] = net._swish(net._bn1(net._conv_head(a)))
        return taps

    def _classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's hidden layer (``"fc"``; ``pooled`` itself without one) and logits
        of the average-pooled head map."""
        if self.classifier is None:
            raise RuntimeError("fit must run before the network describes images")
        hidden = pooled if self.hidden is None else self.classifier[:2](pooled)
        return hidden, self.classifier[-1](hidden)

    def _tail_parameters(self) -> list[nn.Parameter]:
        net = self.net.net
        modules = [*net._blocks[self.train_from :], net._conv_head, net._bn1]
        return [p for m in modules for p in m.parameters()]

    def fit(self, images: Images, labels: npt.NDArray[np.int64]) -> FinetunedLite0:
        """Train the classifier on the frozen network's pooled head maps (the linear probe,
        ``probe_steps`` mini-batches of 128), then the tail and the classifier together for
        ``epochs`` with cross-entropy on ``labels`` (any integers)."""
        if labels is None or len(labels) != len(images):
            raise ValueError("fine-tuning with cross-entropy needs one label per image")
        classes, y = np.unique(np.asarray(labels), return_inverse=True)
        targets = torch.from_numpy(y.astype(np.int64))
        inputs = [maps[-1] for maps in self._front(images, remember=True)]
        torch.manual_seed(self.seed)
        width = self.net.out_dim if self.hidden is None else self.hidden
        layers: list[nn.Module] = [nn.Linear(width, len(classes))]
        if self.hidden is not None:
            layers = [nn.Linear(self.net.out_dim, self.hidden), nn.ReLU(), *layers]
        self.classifier = nn.Sequential(*layers)
        rng = np.random.default_rng(self.seed)
        self._probe(inputs, targets, rng)
        tail = self._tail_parameters()
        for p in tail:
            p.requires_grad_(True)
        optimiser = torch.optim.Adam(
            [
                {"params": list(self.classifier.parameters()), "lr": self.lr},
                {"params": tail, "lr": self.backbone_lr},
            ]
        )
        n = len(images)
        for _ in tqdm(range(self.epochs), desc="fine-tuning epochs", leave=False):
            batches = [
                (s, rows)
                for s in range(len(self.sizes))
                for rows in np.array_split(rng.permutation(n), max(1, -(-n // self.batch_size)))
            ]
            for b in rng.permutation(len(batches)):
                s, rows = batches[b]
                index = torch.from_numpy(rows)
                x = dihedral(inputs[s][index].float(), int(rng.integers(8)))
                logits = self._classify(self._tail(x)["head"].mean(dim=(2, 3)))[1]
                loss = F.cross_entropy(logits, targets[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        for p in tail:
            p.requires_grad_(False)
        return self

    def _probe(
        self, inputs: list[torch.Tensor], targets: torch.Tensor, rng: np.random.Generator
    ) -> None:
        """The classifier alone on the frozen pooled head maps of every size (a random
        classifier's first gradients would otherwise distort the pretrained tail, as
        ``models.finetune`` measured)."""
        with torch.inference_mode():
            pooled = torch.cat(
                [
                    torch.cat(
                        [
                            self._tail(x[i : i + 256])["head"].mean(dim=(2, 3))
                            for i in range(0, len(x), 256)
                        ]
                    )
                    for x in inputs
                ]
            )
        pooled, y = pooled.clone(), targets.repeat(len(inputs))
        optimiser = torch.optim.Adam(self.classifier.parameters(), lr=self.lr)
        for _ in range(self.probe_steps):
            index = torch.from_numpy(rng.integers(0, len(y), min(128, len(y))))
            loss = F.cross_entropy(self._classify(pooled[index])[1], y[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()

    def maps(self, images: Images) -> list[dict[str, torch.Tensor]]:
        """Per input size, the maps named in ``layers`` (``"fc"``: the classifier's hidden
        layer, (n, hidden)) and ``"logits"``, float32."""
        out = []
        for front in self._front(images, remember=False):
            with torch.inference_mode():
                taps = self._tail(front[-1])
                taps["fc"], taps["logits"] = self._classify(taps["head"].mean(dim=(2, 3)))
            taps.update(
                (f"b{k}", t.float()) for k, t in zip(self._front_taps, front[:-1], strict=True)
            )
            out.append({n: taps[n] for n in (*self.layers, "logits")})
        return out
