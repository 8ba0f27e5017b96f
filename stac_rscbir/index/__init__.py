"""FAISS hash indexes over the codes of one model: derived data, rebuilt from the store."""
