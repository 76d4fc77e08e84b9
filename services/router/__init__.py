"""Gray router: the only public entry. It verifies the caller's token, picks the monolith or the
CQRS service by the rules file, and streams the request to that side."""
