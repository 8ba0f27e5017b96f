"""Load a model from its checkpoint folder: the one place that knows which class a folder
holds, read from its config's ``kind`` (``ingest``, ``serve``'s queries and ``--encode-with``,
``listen`` and the Dask workers all come through here)."""

from __future__ import annotations

from pathlib import Path

import torch

from stac_rscbir.models.config import DESCRIPTOR_KIND, load_config
from stac_rscbir.models.descriptor_model import DescriptorEncoder
from stac_rscbir.models.encoder import HashEncoder

#: What a loaded checkpoint is: both take raw-unit chips (N, bands, H, W) and give ({0,1}
#: codes, float descriptors), and binarise descriptors (``binarize``).
Encoder = HashEncoder | DescriptorEncoder


def load_encoder(directory: Path, device: str | torch.device = "cpu") -> Encoder:
    """The model in ``directory``: a network (:class:`HashEncoder`, on ``device``) or a survey
    descriptor + shallow hasher (:class:`DescriptorEncoder`, on the CPU)."""
    if load_config(directory).kind == DESCRIPTOR_KIND:
        return DescriptorEncoder.load(directory)
    return HashEncoder.load(directory, device=device)
