"""The retrieval benchmark protocol on a labelled image folder (AID's ``path,class`` CSV).

60/40 split per class (seeded); methods train on the 60 %; each held-out image queries the other
held-out images. Frozen-backbone descriptors are computed once and cached on disk, so every
method x bit length after the first costs only its training. The survey's traditional
descriptors (``descriptors.registry``) are rows too, cached the same way at their own input size:
``NAME`` (float, Euclidean) and ``NAME+itq`` / ``NAME+lsh`` (hashed at the requested bits).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stac_rscbir.data.imagefolder import LabelledImages, read_labels_csv, split_per_class
from stac_rscbir.descriptors.cache import cached_descriptors
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.eval.metrics import evaluate_codes, evaluate_float
from stac_rscbir.extension.codec import pack_bits
from stac_rscbir.models.features import cached_features
from stac_rscbir.models.finetune import Finetune, encode_tta, train_finetuned, training_inputs
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.shallow_hashing import (
    FEATURE_HASHERS,
    HASHER_REFERENCES,
    HASHERS,
    fit_hasher,
)
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

BASELINES = ("float-knn", *FEATURE_HASHERS, "random")


@dataclass(frozen=True)
class BenchSetup:
    """What defines a benchmark run besides method and bits."""

    images: Path
    labels: Path
    backbone: str = "efficientnet-lite0"
    input_size: int = 150
    seed: int = 0
    train_fraction: float = 0.6
    cache_dir: Path = Path(".cache/features")
    iterations: int = 2000
    device: str | None = None
    finetune: str | None = None  # None (frozen descriptors), "all" or a block count
    epochs: float = 3.0  # fine-tuning runs epochs, the frozen path iterations
    batch_size: int | None = None  # default: 128 frozen, 64 fine-tuning
    lr: float | None = None  # the head's learning rate (default: the preset's)
    backbone_lr: float | None = None  # default: a tenth of the head's
    tta: bool = False  # mean relaxed code over the 8 dihedral views at encoding
    probe: bool = True  # fine-tuning starts from a head trained on frozen features
    freeze_bn: bool = True  # fine-tuning keeps the ImageNet BatchNorm statistics

    def train_config(self) -> TrainConfig:
        """The training settings of a learned method under this setup."""
        if self.finetune is None:
            return TrainConfig(
                iterations=self.iterations,
                batch_size=self.batch_size or 128,
                lr=self.lr,
                seed=self.seed,
                device=self.device,
            )
        return TrainConfig.finetuning(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            backbone_lr=self.backbone_lr,
            freeze_bn=self.freeze_bn,
            seed=self.seed,
            device=self.device,
        )


def descriptor_hashers(name: str) -> list[str]:
    """The shallow hashers that ``<name>+<hasher>`` rows may use on descriptor ``name``: none
    where its rows are not hashed, pLSH [23] only on bag-of-words histograms."""
    spec = DESCRIPTORS[name]
    if not spec.hashable:
        return []
    return [h for h in HASHERS if h != "plsh" or spec.histogram]


def method_names() -> list[str]:
    """Every value ``--method`` accepts."""
    hashed = [f"{name}+{hasher}" for name in DESCRIPTORS for hasher in descriptor_hashers(name)]
    return [*METHODS, *BASELINES, *DESCRIPTORS, *hashed]


def method_error(method: str) -> str | None:
    """Why ``--method`` does not accept ``method`` (None where it does)."""
    if method in method_names():
        return None
    name, _, hasher = method.partition("+")
    if name in DESCRIPTORS and hasher in HASHERS:
        allowed = descriptor_hashers(name)
        why = f"use one of {allowed}" if allowed else "its rows are not hashed"
        return f"{hasher} does not hash descriptor {name!r}: {why}"
    return (
        f"unknown method {method!r}: a preset {sorted(METHODS)}, a baseline {list(BASELINES)}, "
        f"a descriptor {list(DESCRIPTORS)} or DESCRIPTOR+HASHER with HASHER in {list(HASHERS)}"
    )


def method_reference(method: str) -> str:
    """The survey references of a ``--method`` value, e.g. ``[1]+[23]`` for ``sift-bovw+plsh``
    (the descriptor's, then the hasher's; ``""`` where neither is a survey system)."""
    refs = []
    for part in method.split("+"):
        spec = DESCRIPTORS.get(part) or METHODS.get(part)
        text = spec.reference if spec is not None else HASHER_REFERENCES.get(part, "")
        found = re.search(r"\[(\d+)\]", text)
        if found:
            refs.append(found.group(0))
    return "+".join(refs)


def run(setup: BenchSetup, method: str, bits: int) -> dict[str, Any]:
    """Train (where the method learns) and evaluate one method at one bit length."""
    return run_with_codes(setup, method, bits)[0]


def run_with_codes(
    setup: BenchSetup, method: str, bits: int
) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray]:
    """:func:`run`, also returning the test codes (packed; None for float-knn) and labels."""
    if error := method_error(method):
        raise ValueError(error)
    data = read_labels_csv(setup.images, setup.labels)
    train_idx, test_idx = split_per_class(data.labels, setup.train_fraction, setup.seed)
    if method.split("+")[0] in DESCRIPTORS:
        return _run_descriptor(setup, method, bits, data, train_idx, test_idx)
    feats, feature_seconds = cached_features(
        data, setup.backbone, setup.input_size, setup.cache_dir, setup.device
    )
    y_train, y_test = data.labels[train_idx], data.labels[test_idx]
    x_train, x_test = feats[train_idx], feats[test_idx]
    self_index = np.arange(len(test_idx))
    result: dict[str, Any] = {"method": method, "bits": bits}
    start = time.perf_counter()
    extra: dict[str, Any] = {}
    packed = None
    if method == "float-knn":
        metrics = evaluate_float(
            x_test.numpy(), x_test.numpy(), y_test, y_test, self_index=self_index
        )
        result["bits"] = None
        extra["descriptor_dim"] = int(x_test.shape[1])
    else:
        if method == "random":
            rng = np.random.default_rng(setup.seed)
            codes = rng.integers(0, 2, (len(test_idx), bits)).astype(np.uint8)
        elif method in FEATURE_HASHERS:
            hasher = fit_hasher(method, bits, x_train.numpy(), y_train, seed=setup.seed)
            codes = hasher.encode(x_test.numpy())
        else:
            spec = METHODS[method]
            finetune = Finetune.parse(setup.finetune)
            second = None
            if spec.two_sources:  # cross-source: panchromatic view <-> RGB, as PAN/MS pairs
                if finetune is not None or setup.tta:
                    raise ValueError("--finetune and --tta apply to single-source presets")
                pan, pan_seconds = cached_features(
                    data,
                    setup.backbone,
                    setup.input_size,
                    setup.cache_dir,
                    setup.device,
                    panchromatic=True,
                )
                second, feature_seconds = pan[train_idx], feature_seconds + pan_seconds
                extra["second_source"] = "panchromatic view of the same images"
            if finetune is not None:
                if setup.backbone != "efficientnet-lite0":
                    raise ValueError("--finetune starts from the ImageNet efficientnet-lite0")
                inputs, seconds = training_inputs(
                    data, finetune, setup.input_size, setup.cache_dir, setup.device
                )
                x_train, x_test = inputs[train_idx], inputs[test_idx]
                feature_seconds += seconds
                extra["finetune"] = finetune.label()
            config = setup.train_config()
            if finetune is None:
                trained = train_hashing(spec, x_train, y_train, bits, config, second_source=second)
            else:
                probe = replace(setup, finetune=None).train_config() if setup.probe else None
                trained, extra["probe_seconds"] = train_finetuned(
                    spec,
                    x_train,
                    feats[train_idx],
                    y_train,
                    bits,
                    config,
                    finetune,
                    None if spec.two_views else probe,
                )
            encode_start = time.perf_counter()
            if setup.tta:
                codes, relaxed, seconds = encode_tta(
                    trained.net,
                    data.select(test_idx),
                    finetune,
                    setup.input_size,
                    setup.cache_dir,
                    setup.device,
                )
                feature_seconds += seconds
                plain = pack_bits(encode(trained.net, x_test)[0])  # TTA's gain, same network
                extra["without_tta"] = {
                    k: evaluate_codes(plain, plain, y_test, y_test, self_index=self_index)[k]
                    for k in ("map_at_20", "map_at_20_truncated", "precision_at_10")
                }
            else:
                codes, relaxed = encode(trained.net, x_test)
            extra["encode_seconds"] = round(time.perf_counter() - encode_start, 3)
            extra["train_only_seconds"] = round(trained.seconds, 3)
            extra["iterations"] = config.steps(len(y_train))
            extra["tta"] = setup.tta
            same_net = evaluate_float(relaxed, relaxed, y_test, y_test, self_index=self_index)
            extra["float_same_network"] = {
                k: same_net[k] for k in ("map_at_20", "map_at_20_truncated")
            }
            extra["device"] = trained.device
        packed = pack_bits(codes)
        metrics = evaluate_codes(packed, packed, y_test, y_test, self_index=self_index)
    result.update(
        _row_fields(metrics, start, train_idx, test_idx, setup.seed),
        backbone=setup.backbone,
        input_size=setup.input_size,
        feature_seconds=round(feature_seconds, 3),
        **extra,
    )
    return result, packed, y_test


def _row_fields(
    metrics: dict[str, Any],
    start: float,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """The fields every row has: its seconds since ``start``, headline metrics and protocol."""
    return {
        "train_seconds": round(time.perf_counter() - start, 3),
        **{k: metrics[k] for k in ("map_at_20", "map_at_20_truncated", "precision_at_10")},
        "n_queries": len(test_idx),
        "n_database": len(test_idx) - 1,
        "n_train": len(train_idx),
        "seed": seed,
        "metrics": metrics,
    }


def _run_descriptor(
    setup: BenchSetup,
    method: str,
    bits: int,
    data: LabelledImages,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray]:
    """A descriptor method's row: ``NAME`` ranks the float descriptors by the method's own
    distance where it has one, else Euclidean (as float-knn), ``NAME+HASHER`` hashes them with a
    shallow hasher fitted on the training descriptors (and labels, where it is supervised)."""
    name, _, hasher_name = method.partition("+")
    spec = DESCRIPTORS[name]
    feats, describe_seconds = cached_descriptors(data, spec, train_idx, setup.cache_dir)
    y_test = data.labels[test_idx]
    x_train, x_test = feats[train_idx], feats[test_idx]
    self_index = np.arange(len(test_idx))
    start = time.perf_counter()
    packed = None
    if hasher_name:
        y_train = data.labels[train_idx]
        hasher = fit_hasher(hasher_name, bits, x_train, y_train, seed=setup.seed)
        packed = pack_bits(hasher.encode(x_test))
        metrics = evaluate_codes(packed, packed, y_test, y_test, self_index=self_index)
    else:
        metric = spec.distance or "euclidean"
        metrics = evaluate_float(
            x_test, x_test, y_test, y_test, metric=metric, self_index=self_index
        )
    result = {
        "method": method,
        "bits": bits if hasher_name else None,
        **_row_fields(metrics, start, train_idx, test_idx, setup.seed),
        "descriptor": spec.reference,
        "descriptor_dim": int(feats.shape[1]),
        "input_size": spec.input_size,
        "describe_seconds": round(describe_seconds, 3),
        "seconds_per_image": round(describe_seconds / len(data), 5),
    }
    return result, packed, y_test
