"""The `ztcqrs` command: run services and workers, the local runner and operator tools."""
