"""Scale-out on a Dask distributed cluster: items partitioned across workers, one model each.

Each task gets a partition of item dicts, the checkpoint folder and a (picklable) sink; a worker
process loads the model once and reuses it for every partition it runs. Idempotence is the
same as locally because it lives in the sink and the items, not in the driver: a rerun skips
what any worker committed. The driver merges the partition reports and finalizes the sink.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pystac

from stac_rscbir.ingest.report import RunReport
from stac_rscbir.ingest.sinks import Sink
from stac_rscbir.ingest.worker import IngestOptions, Ingestor


@functools.lru_cache(maxsize=2)
def _worker_ingestor(checkpoint: str, options: IngestOptions) -> Ingestor:
    """The model of this worker process, loaded on first use."""
    return Ingestor.from_checkpoint(Path(checkpoint), options)


def _run_partition(
    item_dicts: list[dict[str, Any]], checkpoint: str, sink: Sink, options: IngestOptions
) -> RunReport:
    ingestor = _worker_ingestor(checkpoint, options)
    return ingestor.run((pystac.Item.from_dict(d) for d in item_dicts), sink)


def ingest_dask(
    address: str | Any,
    items: Iterable[pystac.Item],
    checkpoint: Path,
    sink: Sink,
    options: IngestOptions | None = None,
    partition_size: int = 16,
) -> RunReport:
    """Encode ``items`` on the Dask cluster at ``address`` (a scheduler address or a Client)."""
    from dask.distributed import Client, as_completed

    options = replace(options or IngestOptions(), progress=False)
    client = address if isinstance(address, Client) else Client(address)
    # self links (absolute) travel along: an in-place catalog sink writes items where they live
    dicts = [i.to_dict(include_self_link=True, transform_hrefs=False) for i in items]
    parts = [dicts[i : i + partition_size] for i in range(0, len(dicts), partition_size)]
    start = time.perf_counter()
    report = RunReport()
    futures = client.map(
        _run_partition, parts, checkpoint=str(checkpoint), sink=sink, options=options, pure=False
    )
    for future in as_completed(futures):
        report.merge(future.result())
    describe = Ingestor.from_checkpoint(Path(checkpoint), replace(options, device="cpu"))
    sink.finalize(describe.model_description())
    report.wall_seconds = round(time.perf_counter() - start, 3)
    if client is not address:
        client.close()
    return report
