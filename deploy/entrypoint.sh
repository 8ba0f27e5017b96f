#!/usr/bin/env bash
# Entrypoint of both images. Configuration comes from environment variables (deploy/README.md):
#   serve [ARGS]     the STAC API over pgstac: stac-rscbir serve --dsn $PGSTAC_DSN ... [ARGS]
#   listen [ARGS]    the pgstac LISTEN consumer (reads PGSTAC_DSN, RSCBIR_MODEL, ... itself)
#   ingest|train|validate|codes|bench|demo [ARGS]   that stac-rscbir command
#   anything else    run as given (dask scheduler, dask worker ..., pypgstac ..., bash)
set -euo pipefail

case "${1:-}" in
  serve)
    shift
    : "${PGSTAC_DSN:?PGSTAC_DSN is not set (postgresql://user:password@host:5432/pgstac)}"
    args=(--dsn "$PGSTAC_DSN" --index-dir "${RSCBIR_INDEX_DIR:-/indexes}"
          --host "${RSCBIR_HOST:-0.0.0.0}" --port "${RSCBIR_PORT:-8080}")
    IFS=',' read -r -a models <<< "${RSCBIR_MODELS:-}"
    for m in "${models[@]}"; do
      if [[ -n "$m" ]]; then args+=(--model "$m"); fi
    done
    if [[ -n "${RSCBIR_ENCODE_WITH:-}" ]]; then args+=(--encode-with "$RSCBIR_ENCODE_WITH"); fi
    exec stac-rscbir serve "${args[@]}" "$@"
    ;;
  listen | ingest | train | validate | codes | bench | demo)
    exec stac-rscbir "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
