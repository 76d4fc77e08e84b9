"""Token verification with a small in-process cache of tokens that passed verification."""

import time
from collections import OrderedDict

from services.shared.security import Principal, TokenVerifier


class CachingVerifier:
    """Verify bearer tokens with `TokenVerifier` and remember valid ones until their `exp`.

    The cache is keyed by the whole token string and contains at most `max_entries` tokens, evicting
    the least recently used. A cached token skips the RSA signature check on later requests.
    NOTE: a cached token stays accepted until it expires even when its signing key is withdrawn
    from the JWKS; access tokens live 300 s by default, which bounds that window.
    """

    def __init__(self, verifier: TokenVerifier, max_entries: int) -> None:
        self.verifier = verifier
        self.max_entries = max_entries
        self._cache: OrderedDict[str, Principal] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        """Return the principal of a valid token, or raise `Unauthorized` saying why it is not."""
        if self.max_entries:
            principal = self._cache.get(token)
            if principal is not None:
                if principal.expires_at > time.time():
                    self._cache.move_to_end(token)
                    return principal
                del self._cache[token]
        principal = await self.verifier.verify(token)
        if self.max_entries and principal.expires_at > time.time():
            self._cache[token] = principal
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return principal

    def __len__(self) -> int:
        return len(self._cache)
