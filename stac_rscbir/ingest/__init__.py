"""The ingestion worker: STAC items -> pixels -> hash codes -> items with ``cbir:`` fields."""
