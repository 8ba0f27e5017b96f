"""The light server (issue 16): installed size without and with the ``ml`` extra, and cold start
of ``stac-rscbir serve`` to its first answered similarity search at 10^5 items.

1. Two fresh venvs (``uv venv`` + ``uv pip install`` of this checkout, not editable, with
   ``--find-links`` where pip's config points, as scripts/setup does): ``light`` = base +
   ``[pgstac]``; ``full`` = base + ``[pgstac,ml,ingest]`` + ``torch==2.13.0`` (CPU). Sizes: the
   venv and its site-packages (apparent bytes), the largest distributions of each, and which of
   torch / odc / rasterio / matplotlib each holds; the entry points imported in each venv.
2. The API image: built with Docker where an engine answers; else its size is estimated as the
   ``python:3.11-slim`` base (``--base-image-mb``, Docker Hub's published size, NOT measured
   here) plus the light venv (the image's /opt/venv holds the same wheels).
3. Cold start: a SQLite store of ``--items`` coded items (benchmarks/service_bench.py's items)
   built once; then, per venv and per case (saved index present / index folder absent), the
   wall time from starting ``<venv>/bin/stac-rscbir serve --db ...`` until ``POST /search``
   with a similarity query by item answers 200 (polled every 20 ms), the server's resident
   memory then, and the time until it first answered at all.

Writes benchmarks/results/light/light_server.json.

    .venv/bin/python benchmarks/light_server.py                  # 10^5 items, 3 runs per case
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from service_bench import COLLECTION, MODEL, items  # noqa: E402

from stac_rscbir.api.server import free_port  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "light"
TORCH_PIN = "torch==2.13.0"
INSTALLS = {"light": "pgstac", "full": "pgstac,ml,ingest"}
HEAVY = ("torch", "odc", "rasterio", "matplotlib", "pyarrow")
ENTRY_POINTS = ("stac_rscbir.cli", "stac_rscbir.api.app", "stac_rscbir.api.pgstac_plugin")


def find_links() -> list[str]:
    """The local wheel folders pip is configured with (scripts/setup points uv at them too)."""
    out = []
    for key in ("global.find-links", ":env:.find-links"):
        got = subprocess.run(
            [sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True
        )
        out += [d for d in got.stdout.split() if Path(d).is_dir()]
    return list(dict.fromkeys(out))


def build_venv(venv: Path, extras: str) -> float:
    """A fresh venv with this checkout and ``extras`` installed; seconds it took."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv not found (scripts/setup installs it into .venv)"
    shutil.rmtree(venv, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([uv, "venv", "-q", "-p", "python3.11", str(venv)], check=True)
    args = [a for d in find_links() for a in ("--find-links", d)]
    pins = [TORCH_PIN] if "ml" in extras.split(",") else []
    python = str(venv / "bin" / "python")
    install = [uv, "pip", "install", "-q", "-p", python, *args, *pins, f"{ROOT}[{extras}]"]
    subprocess.run(install, check=True)
    return time.perf_counter() - start


def tree_bytes(path: Path) -> int:
    """Apparent size of the files under ``path`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
    return total


def site_packages(venv: Path) -> Path:
    (found,) = (venv / "lib").glob("python3*/site-packages")
    return found


def sizes(venv: Path) -> dict[str, Any]:
    """Venv and site-packages MB, the 8 largest top-level entries, the heavy ones present."""
    site = site_packages(venv)
    entries = {p.name: tree_bytes(p) if p.is_dir() else p.stat().st_size for p in site.iterdir()}
    largest = sorted(entries.items(), key=lambda kv: -kv[1])[:8]
    return {
        "venv_mb": round(tree_bytes(venv) / 2**20, 1),
        "site_packages_mb": round(tree_bytes(site) / 2**20, 1),
        "largest_mb": {k: round(v / 2**20, 1) for k, v in largest},
        "heavy_present": [h for h in HEAVY if (site / h).is_dir()],
    }


def imports(venv: Path) -> dict[str, Any]:
    """Per entry point: importable?, the heavy modules its import pulled in, and ms it took;
    also ``import torch`` where installed (what ``serve`` paid at start before issue 16)."""
    out = {}
    torch = ("torch",) if (site_packages(venv) / "torch").is_dir() else ()
    for name in (*ENTRY_POINTS, *torch):
        code = (
            f"import sys, time; t = time.perf_counter(); import {name}; "
            "print(round((time.perf_counter() - t) * 1000), "
            f"sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
        )
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-c", code],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
        )
        if done.returncode:
            out[name] = {"ok": False, "error": done.stderr.strip().splitlines()[-1]}
        else:
            ms, heavy = done.stdout.split(" ", 1)
            out[name] = {"ok": True, "ms": int(ms), "heavy": json.loads(heavy.replace("'", '"'))}
    return out


def docker_image(extras: str) -> dict[str, Any] | None:
    """Build deploy/Dockerfile.api with ``EXTRAS=extras`` and return its size; None without an
    engine."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True).returncode:
        return None
    tag = f"stac-rscbir-api:bench-{extras.replace(',', '-')}"
    build = ["build", "-q", "-f", "deploy/Dockerfile.api", "--build-arg", f"EXTRAS={extras}"]
    subprocess.run([docker, *build, "-t", tag, "."], cwd=ROOT, check=True)
    got = subprocess.run(
        [docker, "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True, text=True
    )
    return {"measured": True, "image_mb": round(int(got.stdout) / 2**20, 1)}


def cold_start(venv: Path, db: Path, index: Path, model: Path, query_id: str) -> dict[str, Any]:
    """Start ``serve`` (with ``--model``: it reads the checkpoint's config); seconds until it
    first answers, and until a similarity search is 200 (the same: the first request is the
    search, answered once the app has started)."""
    port = free_port()
    cmd = [str(venv / "bin" / "stac-rscbir"), "serve", "--db", str(db), "--index-dir", str(index)]
    cmd += ["--model", str(model)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", RSCBIR_WRITE_TOKEN="")
    body = {
        "limit": 10,
        "similarity": {"model": MODEL, "item": {"collection": "bench", "id": query_id}, "k": 10},
    }
    first_answer = None
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited: {proc.stderr.read().decode()[-2000:]}")
                try:
                    r = client.post("/search", json=body)
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                now = time.perf_counter() - start
                first_answer = first_answer if first_answer is not None else now
                if r.status_code == 200:
                    assert r.json()["features"][0]["id"] == query_id, r.text[:300]
                    ready = now
                    break
                time.sleep(0.02)
        rss = next(
            int(line.split()[1]) // 1024
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {"first_answer_s": round(first_answer, 3), "ready_s": round(ready, 3), "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="cold starts per venv and case")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rscbir-light"
    )
    parser.add_argument("--reuse-venvs", action="store_true", help="keep venvs already built")
    parser.add_argument("--base-image-mb", type=float, default=131.0)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "items": args.items,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "installs": {},
    }
    for name, extras in INSTALLS.items():
        venv = args.workdir / name
        took = None
        if not (args.reuse_venvs and (venv / "bin" / "stac-rscbir").exists()):
            took = round(build_venv(venv, extras), 1)
        result["installs"][name] = {
            "extras": extras,
            "install_s": took,
            **sizes(venv),
            "imports": imports(venv),
        }
        print(name, json.dumps(result["installs"][name]), flush=True)

    image = docker_image(INSTALLS["light"])
    light = result["installs"]["light"]
    full = result["installs"]["full"]
    result["api_image"] = image or {
        "measured": False,
        "note": "no Docker engine here: the image size is ESTIMATED as the python:3.11-slim base "
        f"({args.base_image_mb} MB, Docker Hub's published size, not measured here) plus the "
        "venv the image copies (/opt/venv: the same wheels as the venv measured here)",
        "light_estimate_mb": round(args.base_image_mb + light["venv_mb"], 1),
        "with_ml_estimate_mb": round(args.base_image_mb + full["venv_mb"], 1),
    }

    db, index = args.workdir / "cold.db", args.workdir / "cold.index"
    if not db.exists():
        from stac_rscbir.store.sqlite import SQLiteStore

        start = time.perf_counter()
        store = SQLiteStore(db)
        store.create_collection(COLLECTION)
        data = items(args.items)
        for i in range(0, len(data), 10_000):
            store.upsert_items(data[i : i + 10_000])
        store.close()
        print(f"store of {args.items} items in {time.perf_counter() - start:.1f} s", flush=True)
    model = args.workdir / "model"
    if not model.is_dir():  # a real checkpoint (random weights): serve reads its config.json
        from tests.api_builders import rgb_checkpoint

        rgb_checkpoint(model, MODEL)
    query_id = f"i{args.items // 2:07d}"
    cold: dict[str, Any] = {}
    for name in INSTALLS:
        venv = args.workdir / name
        for case in ("index absent", "index present"):
            runs = []
            for _ in range(args.runs):
                if case == "index absent":
                    shutil.rmtree(index, ignore_errors=True)
                else:
                    assert index.is_dir() and any(index.iterdir()), "no saved index to start from"
                runs.append(cold_start(venv, db, index, model, query_id))
                print(name, case, runs[-1], flush=True)
            cold[f"{name}, {case}"] = {
                "runs": runs,
                "median_ready_s": sorted(r["ready_s"] for r in runs)[len(runs) // 2],
            }
    result["cold_start"] = cold
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "light_server.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
