"""The embedded default: the local API server, its renderer, and the launcher of the local services."""
