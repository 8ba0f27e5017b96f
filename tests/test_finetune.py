"""Fine-tuning: the split backbone, the schedule, the learning-rate groups, BatchNorm handling,
resuming a killed run, and `train --finetune` / `bench retrieval --finetune` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.models.backbones import BackboneTail, EfficientNetLite0
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.finetune import Finetune
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.training import STATE_NAME, TrainConfig, train_hashing

runner = CliRunner()


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    torch.manual_seed(0)
    return EfficientNetLite0(3, pretrained=False).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("block", [0, 3, 11, 16])
def test_the_split_network_computes_the_whole_one(lite0, images, block):
    with torch.no_grad():
        whole = lite0(images)
        split = lite0.forward_from(lite0.activations(images, block), block)
    torch.testing.assert_close(split, whole, rtol=0, atol=0)


def test_a_tail_trains_only_its_blocks_and_keeps_the_front_in_eval_mode(images):
    net = EfficientNetLite0(3, pretrained=False)
    tail = BackboneTail(net, start=11, train_from=13).train()
    trainable = {n for n, p in tail.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("backbone.net._blocks.13.", "backbone.net._blocks.14."))
        or n.startswith(
            ("backbone.net._blocks.15.", "backbone.net._conv_head", "backbone.net._bn1")
        )
        for n in trainable
    )
    assert not net.net._blocks[12].training and not net.net._bn0.training
    assert net.net._blocks[13].training
    with torch.no_grad():
        acts = net.activations(images, 11)
    tail(acts).sum().backward()
    grads = {n for n, p in tail.named_parameters() if p.grad is not None}
    assert grads == trainable
    tail.eval()
    with torch.no_grad():
        torch.testing.assert_close(tail(acts), net.eval()(images), rtol=0, atol=0)


def test_finetune_modes_parse_and_refuse_nonsense():
    assert Finetune.parse(None) is None
    assert Finetune.parse("all") == Finetune(None) and Finetune(None).train_from == 0
    five = Finetune.parse("5")
    assert five is not None and (five.train_from, five.cache_block) == (11, 11)
    eight = Finetune.parse("8")
    assert eight is not None and (eight.train_from, eight.cache_block) == (8, 8)
    for bad in ("17", "-1", "some"):
        with pytest.raises(ValueError, match="--finetune takes 'all' or a block count"):
            Finetune.parse(bad)


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(warmup=0.2, schedule="cosine")
    total = 10
    factors = [cfg.lr_factor(s, total) for s in range(total)]
    assert factors[:2] == [0.5, 1.0]  # 2 warm-up steps: 1/2, 2/2
    expected = [0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, total)]
    assert factors[2:] == pytest.approx(expected)
    assert TrainConfig().lr_factor(7, total) == 1.0
    assert TrainConfig(epochs=2.5, batch_size=4).steps(10) == 7  # ceil(2.5 * 10 / 4)
    assert TrainConfig(iterations=9).steps(10) == 9


def _tiny_run(cfg: TrainConfig, augment=None):
    torch.manual_seed(0)
    net = EfficientNetLite0(3, pretrained=False)
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        acts = net.activations(x, 14)
    labels = np.arange(12) % 3
    result = train_hashing(
        METHODS["dhcnn"], acts, labels, 16, cfg, backbone=BackboneTail(net, 14, 14), augment=augment
    )
    return net, result


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(iterations=6, batch_size=6, seed=0, progress=False, **kw)


def test_backbone_trains_at_its_own_learning_rate():
    torch.manual_seed(0)
    before = EfficientNetLite0(3, pretrained=False)  # the network _tiny_run starts from
    frozen_net, _ = _tiny_run(_cfg(backbone_lr=1e-12))
    moved_net, _ = _tiny_run(_cfg(backbone_lr=1e-2))
    key = "net._blocks.15._project_conv.weight"
    start = before.state_dict()[key]
    assert (frozen_net.state_dict()[key] - start).abs().max() < 1e-9
    assert (moved_net.state_dict()[key] - start).abs().max() > 1e-4
    # the blocks before train_from never move
    front = "net._blocks.3._project_conv.weight"
    torch.testing.assert_close(moved_net.state_dict()[front], before.state_dict()[front])


def test_freeze_bn_keeps_the_backbone_statistics():
    torch.manual_seed(0)
    start = EfficientNetLite0(3, pretrained=False).state_dict()["net._bn1.running_mean"]
    kept, _ = _tiny_run(_cfg(freeze_bn=True))
    updated, _ = _tiny_run(_cfg(freeze_bn=False))
    torch.testing.assert_close(kept.state_dict()["net._bn1.running_mean"], start)
    assert not torch.allclose(updated.state_dict()["net._bn1.running_mean"], start)


class _Killed(Exception):
    pass


class _AugmentThatDies:
    """A feature-map augmentation (with its own generator) that raises on its n-th call."""

    def __init__(self, die_at: int | None) -> None:
        self.rng = np.random.default_rng(5)
        self.calls = 0
        self.die_at = die_at

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.die_at:
            raise _Killed
        return x * float(self.rng.uniform(0.9, 1.1))


def test_a_killed_run_resumes_where_its_last_state_was_saved(tmp_path: Path):
    reference_net, reference = _tiny_run(_cfg(), augment=_AugmentThatDies(None))
    cfg = _cfg(checkpoint_dir=tmp_path, checkpoint_every=2)
    with pytest.raises(_Killed):
        _tiny_run(cfg, augment=_AugmentThatDies(5))  # dies in step 4, after the state of step 4
    assert torch.load(tmp_path / STATE_NAME, weights_only=False)["step"] == 4
    resumed_net, resumed = _tiny_run(
        _cfg(checkpoint_dir=tmp_path, checkpoint_every=2), augment=_AugmentThatDies(None)
    )
    for key, value in reference_net.state_dict().items():
        torch.testing.assert_close(resumed_net.state_dict()[key], value, msg=key)
    assert [h["loss"] for h in resumed.history] == pytest.approx(
        [h["loss"] for h in reference.history]
    )
    with pytest.raises(ValueError, match="saved by another training run"):
        _tiny_run(_cfg(checkpoint_dir=tmp_path, checkpoint_every=2, lr=0.5))


def test_the_contrastive_preset_needs_augmented_views():
    with pytest.raises(ValueError, match="two augmented views"):
        train_hashing(METHODS["contrastive"], torch.randn(8, 16), np.zeros(8, int), 16, _cfg())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two classes of noisy solid-colour 32x32 images, 6 each, with a path,class CSV."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = ["path,class"]
    for name, rgb in {"water": (20, 60, 160), "desert": (210, 180, 120)}.items():
        (root / name).mkdir()
        for i in range(6):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
            rows.append(f"{name}/{i}.png,{name}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root, root / "labels.csv"


def test_train_finetune_saves_the_tuned_backbone_with_tta(folder, tmp_path: Path):
    images, csv = folder
    out = tmp_path / "model"
    args = ["--images", str(images), "--labels", str(csv), "--method", "dhcnn", "--bits", "16"]
    result = runner.invoke(
        app,
        [
            "train",
            *args,
            "--finetune",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--backbone-lr",
            "0.01",
            "--tta",
            "--input-size",
            "32",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--resume-dir",
            str(tmp_path / "state"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "backbone last 2 blocks, TTA" in result.output
    encoder = HashEncoder.load(out)
    assert encoder.config.tta and encoder.config.extra["finetune"] == "last 2 blocks"
    assert (tmp_path / "state" / STATE_NAME).is_file()
    tuned = encoder.net.backbone.state_dict()["net._blocks.15._project_conv.weight"]
    imagenet = EfficientNetLite0(3).state_dict()["net._blocks.15._project_conv.weight"]
    assert not torch.allclose(tuned, imagenet)  # the fine-tuned weights were saved
    front = "net._blocks.2._project_conv.weight"
    torch.testing.assert_close(
        encoder.net.backbone.state_dict()[front], EfficientNetLite0(3).state_dict()[front]
    )
    bad = runner.invoke(app, ["train", *args, "--finetune", "20", "--out", str(out)])
    assert bad.exit_code == 2 and "--finetune takes 'all' or a block count" in bad.output


@pytest.mark.parametrize("finetune", ["1", "all"])
def test_bench_retrieval_finetunes_and_reports_it(folder, tmp_path: Path, finetune: str):
    images, csv = folder
    out = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "bench",
            "retrieval",
            "--images",
            str(images),
            "--labels",
            str(csv),
            "--method",
            "dhcnn",
            "--bits",
            "16",
            "--finetune",
            finetune,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--tta",
            "--input-size",
            "32",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["tta"] is True and row["finetune"] == Finetune.parse(finetune).label()
    assert row["iterations"] == 2  # 8 training images (4 of each class's 6), batch 4, 1 epoch
    assert 0.0 <= row["map_at_20"] <= 1.0 and row["float_same_network"]["map_at_20"] >= 0.0
