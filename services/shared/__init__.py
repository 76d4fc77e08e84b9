"""Library shared by every ztcqrs service: settings, logging, token verification, the event
envelope, stream consumers, SQLite access and the order domain rules both sides must agree on."""
