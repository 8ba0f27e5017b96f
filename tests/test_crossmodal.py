"""Cross-modal S2/S1 hashing on BigEarthNet pairs: one branch per sensor, one Hamming space,
from training through the checkpoint and one ingestion run to the search API."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from fastapi.testclient import TestClient

from stac_rscbir.data.bigearthnet import S1_BANDS, S2_BANDS, BenPatches, load_ben, read_s1_patch
from stac_rscbir.extension.cbir import CBIRModel, HashCode
from stac_rscbir.ingest.sinks import StoreSink
from stac_rscbir.ingest.worker import IngestOptions, Ingestor
from stac_rscbir.models.checkpoint import load_checkpoint
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.recipes import train_crossmodal
from stac_rscbir.models.training import TrainConfig

from .api_builders import DEPLOYMENTS, Deployment
from .conftest import open_deployment, require
from .stac_builders import ben_item

BEN = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bigearthnet"
GEO = BEN / "georeferenced"
BITS = 32
MODEL = "ben-s2-s1-test"

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def pairs() -> tuple[BenPatches, BenPatches]:
    """BENv1 + BENv2 labelled pairs, row i of both the same patch."""
    require((BEN / "BENv1").exists(), f"BigEarthNet v1/v2 patches not found under {BEN}")
    return load_ben(BEN, "s2", ["v1", "v2"]), load_ben(BEN, "s1", ["v1", "v2"])


def _train(pairs: tuple[BenPatches, BenPatches], iterations: int) -> HashEncoder:
    train = [i for i, s in enumerate(pairs[0].split) if s in ("train", "val")]
    config = TrainConfig(iterations=iterations, batch_size=16, seed=0, progress=False)
    encoder, _ = train_crossmodal(
        pairs[0].select(train), pairs[1].select(train), bits=BITS, config=config, model_id=MODEL
    )
    return encoder


@pytest.fixture(scope="module")
def model(pairs: tuple[BenPatches, BenPatches], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained two-branch ``duch`` checkpoint (S2 = branch 0, S1 = branch 1)."""
    return _train(pairs, 120).save(tmp_path_factory.mktemp("crossmodal") / MODEL)


def _pair_hamming(encoder: HashEncoder, s2: BenPatches, s1: BenPatches) -> np.ndarray:
    """(N, N) Hamming distances between S2 codes (rows) and S1 codes (columns) of raw patches."""
    b2, _ = encoder.encode_numpy(s2.images, source=0)
    b1, _ = encoder.encode_numpy(s1.images, source=1)
    assert b2.shape == b1.shape == (len(s2), BITS) and set(np.unique(np.r_[b2, b1])) <= {0, 1}
    return (b2[:, None, :] != b1[None, :, :]).sum(-1).astype(np.float64)


def test_training_pulls_the_two_views_of_each_patch_together(
    pairs: tuple[BenPatches, BenPatches], model: Path
) -> None:
    s2, s1 = pairs
    assert s2.names == s1.names and np.array_equal(s2.labels, s1.labels)  # co-registered rows
    test = [i for i, s in enumerate(s2.split) if s == "test"]
    held_out = s2.select(test), s1.select(test)
    off = ~np.eye(len(test), dtype=bool)
    before = _pair_hamming(_train(pairs, 0), *held_out)
    after = _pair_hamming(HashEncoder.load(model), *held_out)
    # untrained branches are unrelated: a patch's S1 code is no closer to its own S2 code than
    # to other patches' (measured: 15.5 vs 15.4 bits of 32)
    assert abs(before[off].mean() - np.diag(before).mean()) < 1.5
    # trained, on patches it never saw: the same place seen by the two sensors is much closer
    # than other places are (measured: 2.6 vs 11.6 bits)
    assert after[off].mean() - np.diag(after).mean() > 5.0
    # rank of the own S1 patch among the 16 S1 codes for each S2 query (ties count half):
    # measured 2.25 on average, untrained 7.9, a random ranking 7.5
    diag = np.diag(after)[:, None]
    ranks = (after < diag).sum(1) + 0.5 * ((after == diag).sum(1) - 1)
    assert ranks.mean() < 4.5


def test_checkpoint_keeps_both_branches_and_encodes_raw_patches_of_either_sensor(
    pairs: tuple[BenPatches, BenPatches], model: Path
) -> None:
    config, _ = load_checkpoint(model)
    assert config.method == "duch" and config.model_id == MODEL
    assert config.bands == list(S2_BANDS) and config.second_source is not None
    assert config.second_source.bands == list(S1_BANDS)
    assert [len(s.bands) for s in config.sources] == [12, 2]
    assert json.loads((model / "config.json").read_text())["second_source"]["bands"] == ["VV", "VH"]
    encoder = HashEncoder.load(model)
    s2, s1 = pairs
    for source, patches in enumerate((s2, s1)):
        bits, relaxed = encoder.encode_numpy(patches.images[:4], source=source)
        assert bits.shape == relaxed.shape == (4, BITS)
        np.testing.assert_array_equal(bits, (relaxed >= 0).astype(np.uint8))  # tanh head: sign
    with pytest.raises(ValueError, match=r"2 band\(s\) given to branch 0 .* takes 12"):
        encoder.encode_numpy(s1.images[:1], source=0)
    with pytest.raises(ValueError, match="has 2 branch"):
        encoder.encode_numpy(s1.images[:1], source=2)
    with pytest.raises(ValueError, match=r"3 band\(s\) given; model .* takes 12 .* or 2"):
        config.source_for_band_count(3)


# --------------------------------------------------------------------------- ingest + API


def _items() -> tuple[list[pystac.Item], dict[str, str]]:
    """Georeferenced S2 and S1 patches as items of two collections, interleaved, and the S1
    item paired with each S2 item (from the S1 labels metadata)."""
    require(GEO.exists(), f"BigEarthNet georeferenced patches not found at {GEO}")
    items, pair = [], {}
    s2 = sorted((GEO / "BigEarthNet-S2-Example").iterdir())
    s1 = sorted((GEO / "BigEarthNet-S1-Example").iterdir())
    for a, b in zip(s2, s1, strict=True):
        for patch, bands, collection in ((a, S2_BANDS, "ben-s2"), (b, S1_BANDS, "ben-s1")):
            item = ben_item(patch, bands)
            item.collection_id = collection
            items.append(item)
    for patch in s1:
        meta = json.loads(next(patch.glob("*_labels_metadata.json")).read_text())
        pair[meta["corresponding_s2_patch"]] = patch.name
    return items, pair


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def api(
    model: Path, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict]]:
    """One ingestion run of mixed S2 and S1 items into the store of each deployment, and the
    deployment's API over it."""
    tmp = tmp_path_factory.mktemp("crossmodal-api")
    with open_deployment(request.param, tmp, request) as deployment:
        yield from _ingested_api(model, deployment)


def _ingested_api(model: Path, deployment: Deployment) -> Iterator[tuple[TestClient, dict]]:
    store = deployment()
    for collection in ("ben-s2", "ben-s1"):
        store.create_collection(
            {
                "type": "Collection",
                "stac_version": "1.1.0",
                "id": collection,
                "description": f"BigEarthNet {collection[-2:].upper()} patches",
                "license": "CDLA-Permissive-1.0",
                "extent": {
                    "spatial": {"bbox": [[-180, -90, 180, 90]]},
                    "temporal": {"interval": [[None, None]]},
                },
                "links": [],
            }
        )
    items, pair = _items()
    options = IngestOptions(batch_size=4, progress=False, device="cpu")
    report = Ingestor.from_checkpoint(model, options).run(items, StoreSink(store))
    assert (report.items_encoded, report.chips_encoded, report.errors) == (12, 0, [])
    with TestClient(deployment.app(models={MODEL: model})) as client:
        yield client, {"deployment": deployment, "pair": pair, "model": model}


def _code(item: dict) -> HashCode:
    (entry,) = item["properties"]["cbir:codes"]
    return HashCode.from_dict(entry)


def _hamming(a: HashCode, b: HashCode) -> int:
    return int((a.bit_array() != b.bit_array()).sum())


def test_one_ingest_run_codes_each_sensor_with_its_branch(api: tuple[TestClient, dict]) -> None:
    client, ctx = api
    encoder = HashEncoder.load(ctx["model"])
    for collection, bands, source in (("ben-s2", S2_BANDS, 0), ("ben-s1", S1_BANDS, 1)):
        body = client.get(f"/collections/{collection}/items").json()
        assert len(body["features"]) == 6
        for item in body["features"]:
            code = _code(item)
            assert code.model == MODEL and code.bits == BITS
            assert code.bands == list(bands)  # which branch made it
            if source == 1:  # equals the model run on the source files read independently
                bits, _ = encoder.encode_numpy(
                    read_s1_patch(GEO / "BigEarthNet-S1-Example" / item["id"])[None], source=1
                )
                np.testing.assert_array_equal(code.bit_array(), bits[0])
        (described,) = [
            CBIRModel.from_dict(m)
            for m in client.get(f"/collections/{collection}").json()["cbir:models"]
        ]
        assert [b["bands"] for b in described.branches] == [list(S2_BANDS), list(S1_BANDS)]


@pytest.mark.parametrize(("query", "archive"), [("ben-s2", "ben-s1"), ("ben-s1", "ben-s2")])
def test_search_ranks_the_other_sensors_items_by_hamming_distance(
    api: tuple[TestClient, dict], query: str, archive: str
) -> None:
    client, _ = api
    codes = {
        (c, i["id"]): _code(i)
        for c in ("ben-s2", "ben-s1")
        for i in client.get(f"/collections/{c}/items").json()["features"]
    }
    for (collection, item_id), code in codes.items():
        if collection != query:
            continue
        body = {
            "collections": [archive],
            "similarity": {"item": {"collection": query, "id": item_id}, "model": MODEL, "k": 6},
        }
        response = client.post("/search", json=body)
        assert response.status_code == 200, response.text
        found = response.json()["features"]
        assert {f["collection"] for f in found} == {archive} and len(found) == 6
        # the oracle: every item of the other sensor by Hamming distance, ties by id
        ranking = sorted(
            (_hamming(code, c), i) for (coll, i), c in codes.items() if coll == archive
        )
        assert [(f["properties"]["cbir:distance"], f["id"]) for f in found] == ranking[:6]
        # the same list from the item's /similar endpoint (GET)
        similar = client.get(
            f"/collections/{query}/items/{item_id}/similar",
            params={"collections": archive, "k": 6, "model": MODEL},
        )
        assert similar.status_code == 200, similar.text
        assert [f["id"] for f in similar.json()["features"]] == [f["id"] for f in found]


def test_an_uploaded_sar_image_is_encoded_by_the_sar_branch(api: tuple[TestClient, dict]) -> None:
    client, _ = api
    patch = sorted((GEO / "BigEarthNet-S1-Example").iterdir())[0]
    pixels = read_s1_patch(patch)
    buf = io.BytesIO()
    with rasterio.open(
        buf, "w", driver="GTiff", width=120, height=120, count=2, dtype="float32"
    ) as dst:
        dst.write(pixels)
    image = base64.b64encode(buf.getvalue()).decode()
    body = {
        "collections": ["ben-s1"],
        "similarity": {"image": image, "model": MODEL, "k": 1},
    }
    response = client.post("/search", json=body)
    assert response.status_code == 200, response.text
    (top,) = response.json()["features"]
    assert top["id"] == patch.name and top["properties"]["cbir:distance"] == 0
    three = {**body, "similarity": {**body["similarity"], "image": _three_band_png()}}
    response = client.post("/search", json=three)
    assert response.status_code == 400
    assert "takes 12" in response.text and "or 2" in response.text


def _three_band_png() -> str:
    buf = io.BytesIO()
    with rasterio.open(buf, "w", driver="PNG", width=8, height=8, count=3, dtype="uint8") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    return base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- CLI


def test_cli_trains_a_two_branch_checkpoint_from_ben_folders(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from stac_rscbir.cli import app

    require((BEN / "BENv1").exists(), f"BigEarthNet v1/v2 patches not found under {BEN}")
    runner = CliRunner()
    out = tmp_path / "xm"
    args = ["train-crossmodal", "--ben", str(BEN), "--out", str(out), "--iterations", "2"]
    result = runner.invoke(app, [*args, "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "S2 + S1 branches" in result.output and "32 pairs" in result.output
    config, _ = load_checkpoint(out)
    assert config.model_id == "xm" and config.method == "duch"
    assert config.second_source is not None and config.second_source.bands == list(S1_BANDS)
    bad = runner.invoke(app, [*args, "--method", "milan"])
    assert bad.exit_code == 1 and "not a two-branch preset" in bad.output
    empty = runner.invoke(app, [*args[:2], str(tmp_path), *args[3:]])
    assert empty.exit_code == 2 and "no BENv1/ or BENv2/" in empty.output


def test_pystac_client_finds_s1_items_like_an_s2_item_over_http(
    api: tuple[TestClient, dict], tmp_path: Path
) -> None:
    """stac_rscbir.client over real HTTP: the same ranking as the API, plus feedback."""
    from pystac_client import Client

    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.client import distances, search_similar

    client, ctx = api
    s2_id, s1_id = next(iter(ctx["pair"].items()))
    expected = [
        (f["id"], f["properties"]["cbir:distance"])
        for f in client.get(
            f"/collections/ben-s2/items/{s2_id}/similar", params={"collections": "ben-s1", "k": 6}
        ).json()["features"]
    ]
    with BackgroundServer(ctx["deployment"].app(models={MODEL: ctx["model"]})) as server:
        stac = Client.open(server.url)
        search = search_similar(
            stac, item=("ben-s2", s2_id), model=MODEL, k=6, collections=["ben-s1"]
        )
        got = [(item.id, d) for item, d in distances(search.items())]
        assert got == expected
        assert all(item.collection_id == "ben-s1" for item in search.items())
        # feedback: the user marks the paired S1 patch relevant; the refined query's code moves
        # toward it (Rocchio on the descriptors, then binarised by the model's head)
        refined = search_similar(
            stac,
            item=("ben-s2", s2_id),
            model=MODEL,
            k=6,
            collections=["ben-s1"],
            relevant=[("ben-s1", s1_id)],
        )
        after = dict((item.id, d) for item, d in distances(refined.items()))
        assert sorted(after) == sorted(i for i, _ in expected)
        assert all(item.collection_id == "ben-s1" for item in refined.items())
        assert after[s1_id] < dict(expected)[s1_id]  # strictly closer: the feedback acted
