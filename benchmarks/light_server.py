"""The light server (issue 16): installed size without and with the ``ml`` extra, and cold start
of ``stac-rscbir serve`` to its first answered similarity search at 10^5 items.

1. Two fresh venvs (``uv venv`` + ``uv pip install`` of this checkout, not editable, with
   ``--find-links`` where pip's config points, as scripts/setup does): ``light`` = base +
   ``[pgstac]``; ``full`` = base + ``[pgstac,ml,ingest]`` + ``torch==2.13.0`` (CPU). Sizes: the
   venv and its site-packages (apparent bytes), the largest distributions of each, and which of
   torch / odc / rasterio / matplotlib each holds; the entry points imported in each venv.
2. The API image: built with Docker where an engine answers; else its size is estimated as the
   ``python:3.11-slim`` base (``--base-image-mb``, Docker Hub's published size, NOT measured
   here) plus each venv (the image's /opt/venv holds the same wheels).
3. Cold start: a SQLite store of ``--items`` coded items (benchmarks/service_bench.py's items)
   built once; then, per venv and per case (saved index present / index folder absent), the
   wall time from starting ``<venv>/bin/stac-rscbir serve --db ... --model CHECKPOINT`` until
   ``POST /search`` with a similarity query by item answers 200 (polled every 20 ms until the
   server accepts connections), and the server's resident memory then. Runs are interleaved
   across installs and cases; the machine's load average is recorded.
4. With ``--before GIT_REF``, the same for the project at that commit installed with
   ``[pgstac]`` (before issue 16: torch and the rest were required, and ``serve --model``
   loaded the checkpoint's weights with torch).

Writes benchmarks/results/light/light_server.json.

    .venv/bin/python benchmarks/light_server.py                  # 10^5 items, 5 runs per case
    .venv/bin/python benchmarks/light_server.py --before 301da11 # + the install before issue 16
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
CASES = ("index absent", "index present")
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


def build_venv(venv: Path, extras: str, source: Path = ROOT) -> float:
    """A fresh venv with the project at ``source`` and ``extras`` installed (torch pinned to
    the CPU build where it comes along); seconds it took."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv not found (scripts/setup installs it into .venv)"
    shutil.rmtree(venv, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([uv, "venv", "-q", "-p", "python3.11", str(venv)], check=True)
    args = [a for d in find_links() for a in ("--find-links", d)]
    torch = "ml" in extras.split(",") or source != ROOT  # before issue 16 torch was required
    pins = [TORCH_PIN] if torch else []
    python = str(venv / "bin" / "python")
    install = [uv, "pip", "install", "-q", "-p", python, *args, *pins, f"{source}[{extras}]"]
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
    """Start ``serve`` (with ``--model``: it reads the checkpoint's config); see
    :func:`first_answer`."""
    port = free_port()
    cmd = [str(venv / "bin" / "stac-rscbir"), "serve", "--db", str(db), "--index-dir", str(index)]
    cmd += ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", RSCBIR_WRITE_TOKEN="")
    return first_answer(cmd, env, port, query_id)


def first_answer(
    cmd: list[str], env: dict[str, str], port: int, query_id: str, collection: str = "bench"
) -> dict[str, Any]:
    """Start the server ``cmd`` (listening on ``port``); seconds until a similarity search by
    item answers 200 (polled every 20 ms until the server accepts connections: its first answer
    is that search, once the app has started), and its resident memory then. The server is
    stopped (SIGTERM: its shutdown saves the index) before returning."""
    body = {
        "limit": 10,
        "similarity": {"model": MODEL, "item": {"collection": collection, "id": query_id}, "k": 10},
    }
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
                try:
                    r = client.post("/search", json=body)
                except httpx.TransportError:
                    time.sleep(0.02)
                    continue
                ready = time.perf_counter() - start
                assert r.status_code == 200, r.text[:300]
                assert r.json()["features"][0]["id"] == query_id, r.text[:300]
                break
        rss = next(
            int(line.split()[1]) // 1024
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {"ready_s": round(ready, 3), "rss_mb": rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="cold starts per venv and case")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "rscbir-light"
    )
    parser.add_argument("--reuse-venvs", action="store_true", help="keep venvs already built")
    parser.add_argument("--base-image-mb", type=float, default=131.0)
    parser.add_argument(
        "--before",
        metavar="GIT_REF",
        help="also measure the project at this commit (e.g. the one before issue 16: torch, "
        "odc-stac, rasterio, matplotlib required) installed with [pgstac]",
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "items": args.items,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "installs": {},
    }
    installs = {name: (extras, ROOT) for name, extras in INSTALLS.items()}
    if args.before:
        source = args.workdir / "before-src"
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        installs["before"] = ("pgstac", source)
        result["before"] = args.before
    for name, (extras, source) in installs.items():
        venv = args.workdir / name
        took = None
        if not (args.reuse_venvs and (venv / "bin" / "stac-rscbir").exists()):
            took = round(build_venv(venv, extras, source), 1)
        result["installs"][name] = {
            "extras": extras,
            "install_s": took,
            **sizes(venv),
            "imports": imports(venv),
        }
        print(name, json.dumps(result["installs"][name]), flush=True)

    image = docker_image(INSTALLS["light"])
    result["api_image"] = image or {
        "measured": False,
        "note": "no Docker engine here: the image size is ESTIMATED as the python:3.11-slim base "
        f"({args.base_image_mb} MB, Docker Hub's published size, not measured here) plus the "
        "venv the image copies (/opt/venv: the same wheels as the venv measured here)",
        **{
            f"{name}_estimate_mb": round(args.base_image_mb + got["venv_mb"], 1)
            for name, got in result["installs"].items()
        },
    }

    db = args.workdir / "cold.db"
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
    # interleaved (run, case, install), so that the load of the shared machine spreads evenly;
    # each install keeps its own index folder (saved by its previous run's shutdown)
    cold: dict[str, Any] = {f"{n}, {c}": {"runs": []} for n in installs for c in CASES}
    result["load_average_before"] = os.getloadavg()
    for _ in range(args.runs):
        for case in CASES:
            for name in installs:
                index = args.workdir / f"cold-{name}.index"
                if case == "index absent":
                    shutil.rmtree(index, ignore_errors=True)
                else:
                    assert index.is_dir() and any(index.iterdir()), "no saved index to start from"
                got = cold_start(args.workdir / name, db, index, model, query_id)
                cold[f"{name}, {case}"]["runs"].append(got)
                print(name, case, got, flush=True)
    result["load_average_after"] = os.getloadavg()
    for row in cold.values():
        ready = sorted(r["ready_s"] for r in row["runs"])
        row.update(median_ready_s=ready[len(ready) // 2], min_ready_s=ready[0])
    result["cold_start"] = cold
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "light_server.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
