"""The named descriptor methods (``stac-rscbir bench retrieval --method NAME``), one line each:
the declarative table the benchmark and the CLI read, as ``models.methods.METHODS`` is for
the deep presets."""

from __future__ import annotations

from stac_rscbir.descriptors import bovw, lbp, morphology, multicode, spectral
from stac_rscbir.descriptors.base import DescriptorSpec
from stac_rscbir.systems import adlf, camf, cnn_wd, mlcnn, sgcn, sparse_ae, ucnn

DESCRIPTORS: dict[str, DescriptorSpec] = {
    spec.name: spec
    for spec in (
        lbp.SPEC,
        spectral.SPEC,
        morphology.SPEC,
        bovw.SPEC,
        multicode.SPEC,
        sparse_ae.SPEC,
        cnn_wd.SPEC,
        mlcnn.SPEC,
        adlf.SPEC,
        adlf.SPEC_NOQE,
        ucnn.SPEC,
        camf.SPEC,
        sgcn.SPEC,
    )
}
