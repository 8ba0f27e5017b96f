"""[21] U. Chaudhuri, B. Banerjee & A. Bhattacharya 2019, "Siamese graph convolutional network
for content based remote sensing image retrieval", Computer Vision and Image Understanding 184,
pp. 22-30 (survey's Table 1: image pairs, random initialisation, graph convolutional network,
supervised metric learning, contrastive loss).

An image becomes a weighted region adjacency graph (RAG); a graph convolutional network (GCN),
trained as a Siamese pair with the contrastive loss on pairs of training images (similar = same
class), maps the graph to a fixed-length embedding: the descriptor, ranked by Euclidean distance.

1. Regions: SLIC superpixels (Achanta et al. 2012, ``skimage.segmentation.slic``) of the image
   resized to 128 px, ``segments=64`` asked (about 47 regions on AID; the paper's count is not
   reproduced: an assumption chosen to keep 8000 images near 10 ms each).
2. Edges (:func:`region_adjacency`): regions i, j with 4-adjacent pixels, weighted as
   ``skimage.graph.rag_mean_color``'s similarity mode,

       w_ij = exp(-||c_i - c_j||^2 / sigma),

   c the region's mean band values in [0, 1] (``sigma=0.01``, assumed: a difference of 0.1 per
   band norm gives e^-1).
3. Node features (:func:`region_features`), assumed: colour and texture statistics of the region,
   no CNN features: per-band mean and standard deviation, the 10-bin histogram of rotation-
   invariant uniform LBP_{8,1} codes of the grey view, the mean gradient magnitude, a 4-bin
   magnitude-weighted gradient-orientation histogram, the area fraction and the centroid
   (y, x): 2B + 18 values, standardised with the training nodes' mean and deviation.
4. GCN (Kipf & Welling 2017, "Semi-supervised classification with graph convolutional
   networks", ICLR; :class:`GraphConv`): ``H' = ReLU(Â H W + b)`` with

       Â = D^-1/2 (A + I) D^-1/2,   D_ii = sum_j (A + I)_ij,

   (:func:`normalized_adjacency`), ``layers=3`` of width ``hidden=256``; the graph readout is the
   mean and the max of the last layer over the graph's nodes, then a linear map to ``dim=128``,
   L2-normalised (the readout, the widths and the normalisation are assumptions: the paper's
   are not reproduced; on AID's 60/40 split, widths 64/64 gave mAP@20 0.474, 128/128 0.497,
   256/128 0.508, and 100 epochs instead of 40 0.447 at 64/64: longer training overfits).
   A batch of graphs is one block-diagonal sparse Â (:func:`block_diagonal`), so one sparse
   product propagates every graph of the batch.
5. Siamese training (shared weights) with the contrastive loss (Hadsell, Chopra & LeCun 2006,
   "Dimensionality reduction by learning an invariant mapping", CVPR),

       L = 1/2 y d^2 + 1/2 (1 - y) max(0, m - d)^2,   d = ||f(G_1) - f(G_2)||_2,

   y = 1 for a pair of the same class (:func:`contrastive_loss`, margin ``m=1`` on the unit-norm
   embeddings). Each epoch pairs every training image with a partner of its own class with
   probability 1/2, else of another class (:func:`sample_pairs`); Adam, ``epochs=40``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from skimage.feature import local_binary_pattern
from skimage.segmentation import slic
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from stac_rscbir.descriptors.base import DescriptorSpec, Images, gray

LBP_BINS = 10  # rotation-invariant uniform LBP_{8,1}: codes 0..9
ORIENTATIONS = 4


@dataclass(frozen=True)
class RegionGraph:
    """One image's weighted RAG: node features, undirected edges (i < j) and their weights."""

    features: npt.NDArray[np.float32]  # (n, f)
    edges: npt.NDArray[np.int64]  # (e, 2)
    weights: npt.NDArray[np.float32]  # (e,)


def superpixels(
    image: npt.NDArray[np.float32], segments: int, compactness: float
) -> npt.NDArray[np.int64]:
    """[21]'s regions: SLIC labels of an (H, W, B) image, renumbered 0..n-1 (Lab distance for
    RGB)."""
    seg = slic(
        image,
        n_segments=segments,
        compactness=compactness,
        start_label=0,
        channel_axis=-1,
        convert2lab=image.shape[2] == 3,
    )
    _, inverse = np.unique(seg, return_inverse=True)
    return inverse.reshape(seg.shape).astype(np.int64)


def region_means(
    values: npt.NDArray[np.float64], labels: npt.NDArray[np.int64], n: int
) -> npt.NDArray[np.float64]:
    """(n, B) mean of the (H, W, B) ``values`` over each label's pixels."""
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    sums = [
        np.bincount(flat, weights=values[:, :, b].ravel(), minlength=n)
        for b in range(values.shape[2])
    ]
    return np.stack(sums, axis=1) / np.maximum(count, 1.0)[:, None]


def region_adjacency(
    labels: npt.NDArray[np.int64], colours: npt.NDArray[np.float64], sigma: float
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """[21]'s weighted RAG: edges (e, 2), i < j, between 4-adjacent regions and their weights
    ``exp(-||c_i - c_j||^2 / sigma)`` from the regions' mean colours ``colours`` (n, B)."""
    pairs = np.concatenate(
        [
            np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], axis=1),
            np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], axis=1),
        ]
    )
    pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
    edges = np.unique(pairs, axis=0).reshape(-1, 2).astype(np.int64)
    d2 = ((colours[edges[:, 0]] - colours[edges[:, 1]]) ** 2).sum(axis=1)
    return edges, np.exp(-d2 / sigma).astype(np.float32)


def region_features(
    image: npt.NDArray[np.float32], labels: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """[21]'s node features, assumed: (n, 2B + 18) colour/texture statistics of each region
    (module docstring, item 3)."""
    n = int(labels.max()) + 1
    h, w = labels.shape
    flat = labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n).astype(np.float64), 1.0)
    pixels = image.astype(np.float64)
    mean = region_means(pixels, labels, n)
    std = np.sqrt(np.maximum(region_means(pixels**2, labels, n) - mean**2, 0.0))
    grey = gray(image).astype(np.float64)
    codes = local_binary_pattern(np.rint(grey * 255).astype(np.uint8), 8, 1.0, "uniform")
    lbp = np.bincount(flat * LBP_BINS + codes.astype(np.int64).ravel(), minlength=n * LBP_BINS)
    lbp = lbp.reshape(n, LBP_BINS) / count[:, None]
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy).ravel()
    angle = np.mod(np.arctan2(gy, gx), np.pi).ravel()
    bins = np.minimum((angle / (np.pi / ORIENTATIONS)).astype(np.int64), ORIENTATIONS - 1)
    energy = np.bincount(flat, weights=magnitude, minlength=n)
    orient = np.bincount(flat * ORIENTATIONS + bins, weights=magnitude, minlength=n * ORIENTATIONS)
    orient = orient.reshape(n, ORIENTATIONS) / np.maximum(energy, 1e-12)[:, None]
    ys, xs = np.mgrid[0:h, 0:w]
    centroid = region_means(np.stack([ys / h, xs / w], axis=2), labels, n)
    texture = [lbp, (energy / count)[:, None], orient]
    shape = [(count / flat.size)[:, None], centroid]
    return np.concatenate([mean, std, *texture, *shape], axis=1).astype(np.float32)


def normalized_adjacency(
    n: int, edges: npt.NDArray[np.int64], weights: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """The non-zeros (rows, cols, values) of ``D^-1/2 (A + I) D^-1/2`` for an n-node graph with
    symmetric weighted adjacency A given by its undirected ``edges`` and ``weights``."""
    loops = np.arange(n, dtype=np.int64)
    rows = np.concatenate([edges[:, 0], edges[:, 1], loops])
    cols = np.concatenate([edges[:, 1], edges[:, 0], loops])
    values = np.concatenate([weights, weights, np.ones(n, np.float32)]).astype(np.float64)
    degree = np.bincount(rows, weights=values, minlength=n)
    values = values / np.sqrt(degree[rows] * degree[cols])
    return rows, cols, values.astype(np.float32)


def block_diagonal(
    graphs: Sequence[RegionGraph],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of graphs as one graph: the block-diagonal sparse Â (N, N), the stacked node
    features (N, f) and each node's graph index (N,)."""
    rows, cols, values, owner = [], [], [], []
    offset = 0
    for g, graph in enumerate(graphs):
        n = len(graph.features)
        r, c, v = normalized_adjacency(n, graph.edges, graph.weights)
        rows.append(r + offset)
        cols.append(c + offset)
        values.append(v)
        owner.append(np.full(n, g, np.int64))
        offset += n
    index = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
    values_t = torch.from_numpy(np.concatenate(values))
    adj = torch.sparse_coo_tensor(index, values_t, (offset, offset), check_invariants=True)
    feats = torch.from_numpy(np.concatenate([g.features for g in graphs]))
    return adj.coalesce(), feats, torch.from_numpy(np.concatenate(owner))


class GraphConv(nn.Module):
    """[21]'s graph convolution, Kipf & Welling's propagation ``Â H W + b`` (Â from
    :func:`normalized_adjacency`)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=False)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, adj: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(adj, self.linear(h)) + self.bias


class GCNEncoder(nn.Module):
    """[21]'s GCN branch (shared by both Siamese inputs): ReLU GCN layers, mean and max readout
    per graph, a linear map, L2 normalisation (readout and normalisation assumed)."""

    def __init__(self, d_in: int, hidden: int = 64, layers: int = 3, dim: int = 64) -> None:
        super().__init__()
        widths = [d_in] + [hidden] * layers
        self.convs = nn.ModuleList(GraphConv(a, b) for a, b in itertools.pairwise(widths))
        self.head = nn.Linear(2 * hidden, dim)

    def forward(
        self, adj: torch.Tensor, x: torch.Tensor, owner: torch.Tensor, n_graphs: int
    ) -> torch.Tensor:
        h = x
        for conv in self.convs:
            h = F.relu(conv(adj, h))
        count = torch.bincount(owner, minlength=n_graphs).clamp(min=1).unsqueeze(1)
        mean = torch.zeros(n_graphs, h.shape[1]).index_add(0, owner, h) / count
        index = owner.unsqueeze(1).expand_as(h)
        peak = torch.zeros(n_graphs, h.shape[1]).scatter_reduce(0, index, h, "amax")  # h >= 0
        return F.normalize(self.head(torch.cat([mean, peak], dim=1)), dim=1)


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, margin: float
) -> torch.Tensor:
    """[21]'s loss, Hadsell et al.'s contrastive ``1/2 y d^2 + 1/2 (1 - y) max(0, m - d)^2``,
    mean over the pairs."""
    d2 = ((a - b) ** 2).sum(dim=1)
    d = torch.sqrt(d2 + 1e-12)
    y = same.to(a.dtype)
    return (0.5 * y * d2 + 0.5 * (1 - y) * F.relu(margin - d) ** 2).mean()


def sample_pairs(
    labels: npt.NDArray[np.int64], rng: np.random.Generator
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """[21]'s Siamese pairs: every row paired with another row of its class (probability 1/2,
    where the class has another row) or of another class (where there is one):
    (first, second, same)."""
    first = rng.permutation(len(labels))
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    second = np.empty_like(first)
    same = rng.random(len(first)) < 0.5
    for k, i in enumerate(first):
        own = members[labels[i]]
        if len(own) == len(labels):
            same[k] = True
        elif len(own) == 1:
            same[k] = False
        if same[k]:
            j = own[rng.integers(len(own) - 1)]
            second[k] = own[-1] if j == i else j  # uniform over the class without i
        else:
            others = np.flatnonzero(labels != labels[i])
            second[k] = others[rng.integers(len(others))]
    return first, second, same


class SiameseGCN:
    """[21]'s Siamese GCN on SLIC region adjacency graphs, as a descriptor (module docstring)."""

    def __init__(
        self,
        segments: int = 64,
        compactness: float = 10.0,
        sigma: float = 0.01,
        hidden: int = 256,
        layers: int = 3,
        dim: int = 128,
        margin: float = 1.0,
        epochs: int = 40,
        batch_pairs: int = 128,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> None:
        self.segments, self.compactness, self.sigma = segments, compactness, sigma
        self.hidden, self.layers, self.dim, self.margin = hidden, layers, dim, margin
        self.epochs, self.batch_pairs, self.lr, self.seed = epochs, batch_pairs, lr, seed
        self._graphs: dict[bytes, RegionGraph] = {}  # the fitted images' graphs, for transform
        self.net: GCNEncoder | None = None
        self.scale: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None

    def graph(self, image: npt.NDArray[np.float32]) -> RegionGraph:
        """The image's RAG, built once per distinct image (fit's images are described again)."""
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()).digest()
        if key not in self._graphs:
            labels = superpixels(image, self.segments, self.compactness)
            colours = region_means(image.astype(np.float64), labels, int(labels.max()) + 1)
            edges, weights = region_adjacency(labels, colours, self.sigma)
            self._graphs[key] = RegionGraph(region_features(image, labels), edges, weights)
        return self._graphs[key]

    def _standardised(self, graphs: Sequence[RegionGraph]) -> list[RegionGraph]:
        assert self.scale is not None
        mu, sd = self.scale
        return [RegionGraph((g.features - mu) / sd, g.edges, g.weights) for g in graphs]

    def _embed(self, graphs: Sequence[RegionGraph]) -> torch.Tensor:
        assert self.net is not None
        adj, x, owner = block_diagonal(graphs)
        return self.net(adj, x, owner, len(graphs))

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> SiameseGCN:
        """Train the GCN on Siamese pairs of the training images (labels required)."""
        if labels is None:
            raise ValueError("sgcn learns from labelled pairs: fit needs the training labels")
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(images) or len(labels) < 2:
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need >= 2, equal")
        raw = [self.graph(im) for im in tqdm(images, desc="sgcn graphs", leave=False)]
        nodes = np.concatenate([g.features for g in raw])
        self.scale = (nodes.mean(axis=0), np.maximum(nodes.std(axis=0), 1e-6).astype(np.float32))
        graphs = self._standardised(raw)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.net = GCNEncoder(nodes.shape[1], self.hidden, self.layers, self.dim)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        self.net.train()
        for _ in tqdm(range(self.epochs), desc="sgcn epochs", leave=False):
            first, second, same = sample_pairs(labels, rng)
            for start in range(0, len(first), self.batch_pairs):
                a = first[start : start + self.batch_pairs]
                b = second[start : start + self.batch_pairs]
                z = self._embed([graphs[i] for i in a] + [graphs[j] for j in b])
                target = torch.from_numpy(same[start : start + self.batch_pairs])
                loss = contrastive_loss(z[: len(a)], z[len(a) :], target, self.margin)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        self.net.eval()
        return self

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, dim) unit-norm embeddings of the images' graphs."""
        if self.net is None:
            raise RuntimeError("SiameseGCN.fit must run before describing images")
        graphs = self._standardised([self.graph(im) for im in images])
        with torch.no_grad():
            return self._embed(graphs).numpy().astype(np.float32)


SPEC = DescriptorSpec(
    name="sgcn",
    reference="[21] Chaudhuri, Banerjee & Bhattacharya 2019, Siamese GCN on region adjacency "
    "graphs",
    factory=SiameseGCN,
    input_size=128,
    learns=True,
    supervised=True,
    any_bands=True,
)
