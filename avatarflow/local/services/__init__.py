"""The launcher of the local services: SeaweedFS, the local API, Prefect on PostgreSQL."""
