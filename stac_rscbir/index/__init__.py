"""FAISS hash indexes over the codes of one model: derived data, kept in step with the store
(its change log) and rebuilt from it when lost."""
