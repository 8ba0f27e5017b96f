"""stac-rscbir: content-based image retrieval for remote-sensing STAC archives (deep hashing)."""

__version__ = "0.1.0"
