"""The main job's flow at small size: real scenes -> catalog -> model -> store -> API -> queries."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from stac_rscbir.api.server import free_port
from stac_rscbir.demo import run_demo

from .conftest import require

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rasters"
LANDSAT = SHARED / "landsat8" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
RGBN = SHARED / "misc" / "rgbn.tif"


@pytest.mark.shared
def test_demo_runs_end_to_end_on_real_scenes(tmp_path: Path) -> None:
    require(LANDSAT.exists() and RGBN.exists(), f"demo rasters not found under {SHARED}")
    rasters = tmp_path / "rasters"
    rasters.mkdir()
    (rasters / LANDSAT.name).symlink_to(LANDSAT)
    for date in ("20160101", "20160401"):  # the same real RGBN scene under two demo dates
        (rasters / f"rgbn_{date}.tif").symlink_to(RGBN)
    results = run_demo(
        tmp_path / "demo",
        port=free_port(),
        stop=True,
        rasters=rasters,
        max_fit_chips=96,
        console=Console(width=140, quiet=True),
    )
    everywhere, nearby = results["all chips"], results["within 3 km"]
    assert everywhere[0][1] == 0 and nearby[0][1] == 0  # the query chip finds itself first
    assert [d for _, d in everywhere] == sorted(d for _, d in everywhere)
    assert len(nearby) == 7
    dated = results["2016-04 .. 2017-12"]
    assert dated and all(i.startswith("rgbn_20160401") for i, _ in dated)  # datetime filter
    assert results["contact_sheet"].stat().st_size > 50_000
