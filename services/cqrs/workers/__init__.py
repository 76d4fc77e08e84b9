"""Workers of the CQRS service, each started with `ztcqrs worker <name>`: outbox relay, CDC ingest,
projector and reverse sync."""
