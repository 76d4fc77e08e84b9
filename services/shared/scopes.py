"""Scopes and service identities. Each endpoint names the scopes it requires."""

ORDERS_READ = "orders:read"
ORDERS_WRITE = "orders:write"
PRODUCTS_READ = "products:read"
SYNC_WRITE = "sync:write"  # the monolith's internal sync API; never granted to a user
GRAY_ADMIN = "gray:admin"  # the router's own admin endpoints

USER_SCOPES = (ORDERS_READ, ORDERS_WRITE, PRODUCTS_READ)

# Client id of the worker that applies CQRS-side writes to the monolith.
REVERSE_SYNC_CLIENT = "cqrs-reverse-sync"
