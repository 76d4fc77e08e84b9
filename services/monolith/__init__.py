"""The legacy monolith: public REST API on SQLite, trigger-based change log, CDC relay and the
internal sync API that applies CQRS-side writes."""
