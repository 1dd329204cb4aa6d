"""Session-scoped real servers for integration tests (filled in by the storage/tracking work)."""
