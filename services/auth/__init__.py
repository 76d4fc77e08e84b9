"""Auth server: OAuth 2.0 token endpoint, JWKS, and the user and client store."""
