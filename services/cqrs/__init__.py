"""The CQRS service: command and query API, SQLite write model with an outbox, Redis read model, and
the workers that move events between them and the monolith."""
