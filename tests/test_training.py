"""Behaviour of training, checkpoints and the inference encoder: every preset learns codes that
rank same-class items first, runs are seeded, fine-tuning reaches the backbone, multi-hot labels
and 12-/2-band images train, and checkpoints round-trip exactly."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from stac_rscbir.eval.metrics import evaluate_codes
from stac_rscbir.models import checkpoint as ckpt
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.checkpoint import load_checkpoint, save_checkpoint
from stac_rscbir.models.config import ModelConfig
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.methods import METHODS, HashingNet
from stac_rscbir.models.training import TrainConfig, TrainResult, encode, train_hashing

from .method_terms import EXPECTED_TERMS

BITS = 16
N_CLASSES = 5
S2_BANDS = ["B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny tensors: one thread is fastest, and immune to spin-waiting on a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clusters(seed: int = 0, n_per: int = 40, d: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """5 Gaussian clusters of 64-d descriptors, close enough that an untrained net ranks
    them poorly (mAP@20 ~0.4, random ~0.3)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=0.5, size=(N_CLASSES, d))
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres])
    return torch.from_numpy(x.astype(np.float32)), np.repeat(np.arange(N_CLASSES), n_per)


def multi_hot(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """One-hot class labels with a random second label on 30% of the items."""
    rng = np.random.default_rng(seed)
    y = np.zeros((len(labels), labels.max() + 1), dtype=np.int64)
    y[np.arange(len(labels)), labels] = 1
    extra = rng.random(len(labels)) < 0.3
    y[np.flatnonzero(extra), rng.integers(0, y.shape[1], int(extra.sum()))] = 1
    return y


def images(labels: np.ndarray, bands: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    """(N, bands, size, size) normalised images whose band means depend on the class."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(int(labels.max()) + 1, bands, 1, 1, generator=gen)
    noise = torch.randn(len(labels), bands, size, size, generator=gen)
    return means[torch.as_tensor(labels)] + noise


def second_view(x: torch.Tensor) -> torch.Tensor:
    """A noisy copy of ``x``: the paired second source of two-source presets."""
    return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))


def cfg(iterations: int = 60, batch_size: int = 48, seed: int = 0) -> TrainConfig:
    return TrainConfig(iterations=iterations, batch_size=batch_size, seed=seed, progress=False)


def map20(query: np.ndarray, labels: np.ndarray, db: np.ndarray | None = None) -> dict[str, float]:
    """mAP@20 of {0,1} codes, each item querying the others (or ``db``, paired by index)."""
    q = np.packbits(query, axis=1)
    d = q if db is None else np.packbits(db, axis=1)
    return evaluate_codes(
        q, d, labels, labels, ks=(20,), self_index=np.arange(len(labels)), random_draws=2
    )


def mean_hamming(codes: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Mean Hamming distance between same-class and between different-class items."""
    dist = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    return float(dist[same & off].mean()), float(dist[~same].mean())


def train(name: str, x: torch.Tensor, y: np.ndarray, config: TrainConfig, **kw) -> TrainResult:
    if METHODS[name].two_sources and "second_source" not in kw:
        kw["second_source"] = second_view(x)
    return train_hashing(METHODS[name], x, y, BITS, config, **kw)


# --------------------------------------------------------------------------------------------
# every preset learns
# --------------------------------------------------------------------------------------------


UNSUPERVISED = ("duch", "contrastive")  # no labels
SUPERVISED = sorted(n for n in METHODS if n not in UNSUPERVISED)


@pytest.mark.parametrize("name", SUPERVISED)
def test_every_preset_learns_codes_that_rank_same_class_items_first(name: str) -> None:
    x, y = clusters()
    torch.manual_seed(0)  # train_hashing's seeding: this is the network it starts from
    untrained, _ = encode(HashingNet(METHODS[name], x.shape[1], BITS, N_CLASSES).eval(), x)
    result = train(name, x, y, cfg())
    bits, relaxed = encode(result.net, x)
    assert bits.shape == relaxed.shape == (len(y), BITS)
    assert bits.dtype == np.uint8 and set(np.unique(bits)) <= {0, 1}
    within, between = mean_hamming(bits, y)
    assert within < 0.5 * between
    trained = map20(bits, y)
    assert trained["map_at_20"] > 0.85
    assert trained["map_at_20"] > trained["random_map_at_20"] + 0.4
    assert trained["map_at_20"] > map20(untrained, y)["map_at_20"] + 0.3
    # the history logs exactly the paper's terms, at the first and the last step
    steps = [h["step"] for h in result.history]
    assert steps[0] == 0 and steps[-1] == 59
    for entry in result.history:
        assert set(entry) == {"step", "loss"} | EXPECTED_TERMS[name]
        assert all(np.isfinite(v) for v in entry.values())
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.device == "cpu" and result.seconds > 0
    assert not result.net.training


def test_sidhcnn_codes_retrieve_across_sources() -> None:
    x, y = clusters()
    x2 = second_view(x)
    net = train("sidhcnn", x, y, cfg(), second_source=x2).net
    first, _ = encode(net, x)
    second, _ = encode(net, x2, source=1)
    cross = map20(second, y, db=first)  # queries from source 2, archive from source 1
    assert cross["map_at_20"] > 0.85
    assert cross["map_at_20"] > cross["random_map_at_20"] + 0.4


def test_duch_maps_the_two_views_of_each_pair_together_without_labels() -> None:
    x, y = clusters()
    x2 = second_view(x)
    noise = np.random.default_rng(3).integers(0, N_CLASSES, len(y))  # labels are not used

    def pair_ranks(net: HashingNet) -> np.ndarray:
        """Rank (0 = nearest) of each item's own first view among all first-view codes, when
        queried with its second view's code (Hamming distance, ties counted against it)."""
        first, _ = encode(net, x)
        second, _ = encode(net, x2, source=1)
        d = (second[:, None, :] != first[None, :, :]).sum(-1)
        return (d < np.diag(d)[:, None]).sum(1) + (d == np.diag(d)[:, None]).sum(1) - 1

    torch.manual_seed(0)
    before = pair_ranks(HashingNet(METHODS["duch"], x.shape[1], BITS, N_CLASSES).eval())
    result = train("duch", x, noise, cfg(), second_source=x2)
    after = pair_ranks(result.net)
    assert result.history[-1]["cross_ntxent"] < result.history[0]["cross_ntxent"]
    # measured: median rank of the paired view 113 -> 0 of 200; within 6.6 vs between 8.4 bits
    assert np.median(after) < 0.1 * np.median(before)
    assert np.median(after) <= 2
    # the NT-Xent codes are not noise per item: same-class items also end up closer
    bits, _ = encode(result.net, x)
    within, between = mean_hamming(bits, y)
    assert within < between


def test_contrastive_codes_without_labels_keep_views_together_and_classes_apart() -> None:
    """Two noisy views of each item (the augmentation), no labels: the codes of an item's
    views end close, and same-class items closer than other items."""
    x, y = clusters()
    gen = torch.Generator().manual_seed(11)

    def noisy(batch: torch.Tensor) -> torch.Tensor:
        return batch + 0.3 * torch.randn(batch.shape, generator=gen)

    noise = np.random.default_rng(3).integers(0, N_CLASSES, len(y))  # labels are not used
    result = train("contrastive", x, noise, cfg(), augment=noisy)
    assert result.history[-1]["cross_ntxent"] < 0.7 * result.history[0]["cross_ntxent"]
    bits, _ = encode(result.net, x)
    view_bits, _ = encode(result.net, second_view(x))
    own = (bits != view_bits).sum(1)
    within, between = mean_hamming(bits, y)
    # measured: own view 2 bits, same class 7.1, other classes 8.3 (of 32)
    assert np.median(own) < 0.5 * within  # an item's other view is nearer than its class
    assert within < 0.9 * between


def test_adversarial_presets_train_their_discriminator_with_its_own_optimiser() -> None:
    x, y = clusters()
    torch.manual_seed(0)
    start = HashingNet(METHODS["adversarial"], x.shape[1], BITS, N_CLASSES)
    assert start.discriminator is not None
    net = train("adversarial", x, y, cfg(iterations=10)).net
    assert net.discriminator is not None
    for before, after in zip(
        start.discriminator.parameters(), net.discriminator.parameters(), strict=True
    ):
        assert not torch.equal(before, after)


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["milan", "sshaae", "triplet"])
def test_same_seed_gives_identical_codes_and_another_seed_different_ones(name: str) -> None:
    x, y = clusters()
    a = train(name, x, y, cfg(iterations=20, seed=3))
    b = train(name, x, y, cfg(iterations=20, seed=3))
    c = train(name, x, y, cfg(iterations=20, seed=4))
    bits_a, relaxed_a = encode(a.net, x)
    bits_b, relaxed_b = encode(b.net, x)
    _, relaxed_c = encode(c.net, x)
    np.testing.assert_array_equal(bits_a, bits_b)
    np.testing.assert_array_equal(relaxed_a, relaxed_b)
    assert a.history == b.history
    assert not np.array_equal(relaxed_a, relaxed_c)


# --------------------------------------------------------------------------------------------
# fine-tuning mode
# --------------------------------------------------------------------------------------------


def test_fine_tuning_trains_the_backbone_end_to_end_with_augmentation() -> None:
    y = np.repeat(np.arange(4), 12)
    x = images(y, bands=12)
    backbone = build_backbone("smallcnn", in_bands=12)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    seen: list[tuple[int, ...]] = []

    def augment(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape))
        return batch.flip(-1)

    result = train(
        "dhcnn", x, y, cfg(iterations=4, batch_size=16), backbone=backbone, augment=augment
    )
    assert result.net.backbone is backbone
    assert seen == [(16, 12, 16, 16)] * 4  # once per step, on the batch of images
    after = backbone.state_dict()
    weights = [k for k in before if k.endswith("weight")]
    assert all(not torch.equal(before[k], after[k]) for k in weights)
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])
    bits, _ = encode(result.net, x, batch_size=10)
    assert bits.shape == (len(y), BITS)


def test_fine_tuned_two_source_preset_pairs_optical_and_sar_backbones() -> None:
    y = np.repeat(np.arange(4), 12)
    s2, s1 = images(y, bands=12), images(y, bands=2, seed=1)
    optical = build_backbone("smallcnn", in_bands=12)
    sar = build_backbone("smallcnn", in_bands=2)
    sar_before = [p.clone() for p in sar.parameters()]
    result = train(
        "sidhcnn",
        s2,
        y,
        cfg(iterations=3, batch_size=16),
        second_source=s1,
        backbone=optical,
        backbone2=sar,
    )
    assert result.net.backbone is optical and result.net.backbone2 is sar
    assert all(not torch.equal(a, b) for a, b in zip(sar_before, sar.parameters(), strict=True))
    assert encode(result.net, s1, source=1)[0].shape == (len(y), BITS)


# --------------------------------------------------------------------------------------------
# multi-label
# --------------------------------------------------------------------------------------------

# batch-hard mining stays on the margin plateau longer before it separates classes
MULTI_LABEL_ITERATIONS = {"milan": 60, "dhcnn": 60, "triplet": 300}


@pytest.mark.parametrize("name", sorted(MULTI_LABEL_ITERATIONS))
def test_multi_hot_labels_train_on_descriptors(name: str) -> None:
    x, y = clusters()
    labels = multi_hot(y)
    result = train(name, x, labels, cfg(iterations=MULTI_LABEL_ITERATIONS[name]))
    assert set(result.history[-1]) == {"step", "loss"} | EXPECTED_TERMS[name]
    bits, _ = encode(result.net, x)
    scores = map20(bits, labels)  # relevant = shares >= 1 label
    assert scores["map_at_20"] > scores["random_map_at_20"] + 0.3


@pytest.mark.parametrize("bands", [12, 2])
@pytest.mark.parametrize("name", sorted(MULTI_LABEL_ITERATIONS))
def test_multi_hot_labels_fine_tune_on_multispectral_and_sar_images(name: str, bands: int) -> None:
    y = np.repeat(np.arange(4), 10)
    labels = multi_hot(y, seed=bands)
    x = images(y, bands=bands)
    backbone = build_backbone("smallcnn", in_bands=bands)
    result = train(name, x, labels, cfg(iterations=3, batch_size=24), backbone=backbone)
    assert all(np.isfinite(v) for h in result.history for v in h.values())
    assert set(result.history[-1]) == {"step", "loss"} | EXPECTED_TERMS[name]
    bits, relaxed = encode(result.net, x)
    assert bits.shape == (len(y), BITS) and np.isfinite(relaxed).all()


# --------------------------------------------------------------------------------------------
# errors and encode()
# --------------------------------------------------------------------------------------------


def test_two_source_preset_without_second_source_names_the_method() -> None:
    x, y = clusters(n_per=4)
    with pytest.raises(ValueError, match=r"'sidhcnn'.*second source"):
        train_hashing(METHODS["sidhcnn"], x, y, BITS, cfg())


def test_mismatched_lengths_are_rejected() -> None:
    x, y = clusters(n_per=4)
    with pytest.raises(ValueError, match="19 inputs but 20 labels"):
        train_hashing(METHODS["dhnn"], x[:-1], y, BITS, cfg())
    with pytest.raises(ValueError, match="19 second-source inputs but 20 labels"):
        train_hashing(METHODS["sidhcnn"], x, y, BITS, cfg(), second_source=x[:-1])


@pytest.mark.parametrize("name", ["milan", "dhnn"])
def test_encode_in_chunks_matches_one_pass_and_thresholds_the_relaxed_codes(name: str) -> None:
    x, _ = clusters(n_per=10)
    torch.manual_seed(0)
    net = HashingNet(METHODS[name], x.shape[1], BITS, N_CLASSES).eval()
    bits, relaxed = encode(net, x)
    chunked_bits, chunked = encode(net, x, batch_size=7)
    np.testing.assert_array_equal(bits, chunked_bits)
    np.testing.assert_allclose(relaxed, chunked, rtol=1e-6, atol=1e-6)
    assert bits.dtype == np.uint8 and relaxed.dtype == np.float32
    threshold = relaxed > 0.5 if METHODS[name].activation == "sigmoid" else relaxed >= 0
    np.testing.assert_array_equal(bits, threshold.astype(np.uint8))


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def model_config(**changes: object) -> ModelConfig:
    fields: dict[str, object] = {
        "method": "milan",
        "bits": 32,
        "bands": list(S2_BANDS),
        "backbone": "smallcnn",
        "mean": [1000.0 + 100 * i for i in range(12)],
        "std": [500.0 + 10 * i for i in range(12)],
        "head": {"n_classes": 4, "classes": ["a", "b", "c", "d"]},
        "extra": {"seed": 0},
        "input_size": 16,
    }
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


def test_checkpoint_round_trips_tensors_and_config_exactly(tmp_path: Path) -> None:
    state = {
        "w": torch.randn(3, 4),
        "transposed": torch.randn(4, 5).t(),  # not contiguous
        "half": torch.randn(6).half(),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    config = model_config()
    assert save_checkpoint(tmp_path / "m", config, state) == tmp_path / "m"
    loaded_config, loaded = load_checkpoint(tmp_path / "m")
    assert loaded_config == config
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["format_version"] == 1


def test_save_leaves_no_temporary_files_and_files_readable_as_a_plain_write(
    tmp_path: Path,
) -> None:
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path, model_config(), {"w": torch.ones(2)})
        save_checkpoint(tmp_path, model_config(bits=64), {"w": torch.zeros(2)})  # overwrite
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    for path in tmp_path.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644
    config, state = load_checkpoint(tmp_path)
    assert config.bits == 64 and torch.equal(state["w"], torch.zeros(2))


def test_failed_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, model_config(), {"w": torch.ones(2)})

    def broken(tensors: dict[str, torch.Tensor], path: str) -> None:
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model_config(bits=64), {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    config, state = load_checkpoint(tmp_path)
    assert config.bits == 32 and torch.equal(state["w"], torch.ones(2))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_checkpoint_file_is_named(tmp_path: Path, missing: str) -> None:
    save_checkpoint(tmp_path, model_config(), {"w": torch.ones(2)})
    (tmp_path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_checkpoint(tmp_path)


def test_missing_checkpoint_folder_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_checkpoint(tmp_path / "nowhere")


def test_wrong_format_version_is_rejected(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, model_config(), {"w": torch.ones(2)})
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw["format_version"] = 2
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version 2, expected 1"):
        load_checkpoint(tmp_path)
    del raw["format_version"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="format_version None"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mean": [0.0] * 11}, "11 means and 12 stds for 12 bands"),
        ({"std": [1.0] * 13}, "12 means and 13 stds for 12 bands"),
        ({"std": [1.0] * 11 + [0.0]}, "std must be positive"),
        ({"std": [1.0] * 11 + [-2.0]}, "std must be positive"),
        ({"std": [1.0] * 11 + [float("nan")]}, "std must be positive"),
    ],
)
def test_model_config_rejects_bad_normalisation(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_config(**changes)


# --------------------------------------------------------------------------------------------
# HashEncoder
# --------------------------------------------------------------------------------------------


def raw_pixels(n: int = 3, seed: int = 0) -> np.ndarray:
    """Raw Sentinel-2-like reflectances, (n, 12, 16, 16)."""
    return np.random.default_rng(seed).uniform(0, 4000, size=(n, 12, 16, 16)).astype(np.float32)


def test_hash_encoder_save_load_gives_identical_codes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = HashEncoder.build(model_config(), pretrained=False)
    pixels = raw_pixels()
    bits, relaxed = encoder.encode_numpy(pixels)
    assert bits.dtype == np.uint8 and bits.shape == (3, 32) and set(np.unique(bits)) <= {0, 1}
    assert relaxed.dtype == np.float32 and relaxed.shape == (3, 32)
    np.testing.assert_array_equal(bits, (relaxed > 0.5).astype(np.uint8))  # MiLaN's sigmoid
    encoder.save(tmp_path / "enc")
    loaded = HashEncoder.load(tmp_path / "enc")
    assert loaded.config == encoder.config and not loaded.training
    again_bits, again_relaxed = loaded.encode_numpy(pixels)
    np.testing.assert_array_equal(bits, again_bits)
    np.testing.assert_array_equal(relaxed, again_relaxed)
    assert loaded.describe()["bands"] == S2_BANDS


def test_hash_encoder_normalises_raw_pixels_with_the_config(tmp_path: Path) -> None:
    config = model_config()
    encoder = HashEncoder.build(config, pretrained=False)
    pixels = torch.from_numpy(raw_pixels())
    mean = torch.tensor(config.mean).view(1, -1, 1, 1)
    std = torch.tensor(config.std).view(1, -1, 1, 1)
    bits, relaxed = encoder(pixels)
    expected_bits, expected = encoder.net.encode((pixels - mean) / std)
    assert torch.equal(bits, expected_bits)
    torch.testing.assert_close(relaxed, expected)


def test_hash_encoder_round_trips_a_fine_tuned_network(tmp_path: Path) -> None:
    y = np.repeat(np.arange(4), 6)
    config = model_config(method="dhcnn", bits=BITS)
    backbone = build_backbone("smallcnn", in_bands=12)
    result = train(
        "dhcnn", images(y, bands=12), y, cfg(iterations=3, batch_size=12), backbone=backbone
    )
    encoder = HashEncoder(config, result.net)
    encoder.save(tmp_path)
    pixels = raw_pixels(seed=1)
    loaded = HashEncoder.load(tmp_path)
    np.testing.assert_array_equal(encoder.encode_numpy(pixels)[1], loaded.encode_numpy(pixels)[1])
    torch.manual_seed(123)
    fresh = HashEncoder.build(config, pretrained=False)
    assert not np.array_equal(fresh.encode_numpy(pixels)[1], loaded.encode_numpy(pixels)[1])


def test_hash_encoder_takes_a_head_trained_on_cached_features() -> None:
    x, y = clusters(n_per=8, d=256)  # SmallCNN descriptors are 256-d
    head_state = train("milan", x, y, cfg(iterations=2)).net.state_dict()
    config = model_config(bits=BITS)
    encoder = HashEncoder.build(config, head_state=head_state, pretrained=False)
    for key, value in head_state.items():
        assert torch.equal(encoder.net.state_dict()[key], value)


def test_hash_encoder_needs_a_backbone_and_a_known_method(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backbone"):
        HashEncoder(model_config(), HashingNet(METHODS["milan"], 64, 32, 4))
    save_checkpoint(tmp_path, model_config(method="nope"), {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        HashEncoder.load(tmp_path)
