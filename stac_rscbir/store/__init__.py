"""Item stores behind one interface: embedded SQLite (default) and pgstac (production)."""
