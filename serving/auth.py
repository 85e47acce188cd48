"""Bearer tokens with scopes for serving's HTTP API.

Each token grants scopes: ``recommend`` (``POST /v1/recommend``), ``feedback`` (``POST
/v1/feedback``), ``cases`` (``GET /v1/cases/{id}``, which returns a user's state vector) and
``admin`` (``GET /v1/stats``); ``*`` grants all. A scope is enforced as soon as one configured
token holds it; a scope no token holds stays open (so a deployment protects what it names, and
the start-up log lists what is open). Several tokens may hold the same scope: rotate by adding
the new token, moving the clients, then removing the old one. Health, readiness and the OpenAPI
document are always open (probes); metrics are on their own port when ``--metrics-port`` is set.

Tokens come from the environment, never from a flag: ``MEMENTO_API_TOKENS`` or the file named by
``MEMENTO_API_TOKENS_FILE`` (a mounted secret), entries ``SCOPE[,SCOPE...]:TOKEN`` separated by
``;`` or new lines; the older ``MEMENTO_API_TOKEN`` is one token with the ``feedback`` scope.

>>> a, b, c = "a" * 20, "b" * 20, "c" * 20
>>> tokens = ApiTokens.parse(f"recommend,feedback:{a}; feedback:{b}\\nadmin:{c}")
>>> sorted(tokens.enforced), tokens.open_scopes()
(['admin', 'feedback', 'recommend'], ['cases'])
>>> tokens.check(f"Bearer {b}", "feedback")
>>> tokens.check(f"Bearer {b}", "recommend")
Traceback (most recent call last):
...
serving.validation.RequestError: the bearer token in the 'Authorization' header does not grant the 'recommend' scope
>>> ApiTokens.parse("").check(None, "cases")   # no tokens: every scope open
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from memento.config import read_secret
from serving.validation import RequestError

__all__ = ["SCOPES", "ApiTokens"]

SCOPES = ("recommend", "feedback", "cases", "admin")


@dataclass(frozen=True)
class ApiTokens:
    """Tokens and the scopes each grants; empty: no authentication."""

    grants: tuple[tuple[bytes, frozenset[str]], ...] = ()

    @classmethod
    def parse(cls, spec: str) -> "ApiTokens":
        """Entries ``SCOPE[,SCOPE...]:TOKEN`` separated by ``;`` or new lines (blank ones skipped)."""
        grants = []
        for entry in spec.replace(";", "\n").splitlines():
            entry = entry.strip()
            if not entry:
                continue
            scopes, sep, token = entry.partition(":")
            names = {s.strip() for s in scopes.split(",") if s.strip()}
            if not sep or not token.strip() or not names:
                raise ValueError("API token entries must look like 'SCOPE[,SCOPE...]:TOKEN' "
                                 f"(scopes {', '.join(SCOPES)} or *); got an entry of {len(entry)} characters")
            unknown = names - set(SCOPES) - {"*"}
            if unknown:
                raise ValueError(f"unknown API token scope(s) {sorted(unknown)}: the scopes are {', '.join(SCOPES)} or *")
            if len(token.strip()) < 16:
                raise ValueError("an API token must have at least 16 characters")
            grants.append((token.strip().encode(), frozenset(SCOPES) if "*" in names else frozenset(names)))
        return cls(tuple(grants))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "ApiTokens":
        """``MEMENTO_API_TOKENS``, or the file ``MEMENTO_API_TOKENS_FILE`` names, plus the older
        ``MEMENTO_API_TOKEN`` (scope ``feedback``)."""
        env = os.environ if environ is None else environ
        spec = env.get("MEMENTO_API_TOKENS", "")
        if not spec and env.get("MEMENTO_API_TOKENS_FILE"):
            spec = read_secret(env["MEMENTO_API_TOKENS_FILE"], "MEMENTO_API_TOKENS_FILE")
        if env.get("MEMENTO_API_TOKEN"):
            spec += f"\nfeedback:{env['MEMENTO_API_TOKEN']}"
        return cls.parse(spec)

    @property
    def enforced(self) -> frozenset[str]:
        """The scopes some token holds: their endpoints need a token."""
        return frozenset().union(*(scopes for _, scopes in self.grants))

    def open_scopes(self) -> list[str]:
        """The scopes no token holds: their endpoints are open."""
        return [s for s in SCOPES if s not in self.enforced]

    def __repr__(self) -> str:  # never the tokens themselves
        return f"ApiTokens({len(self.grants)} tokens, enforced={sorted(self.enforced)})"

    def check(self, header: str | None, scope: str) -> None:
        """Raise a 401 (no bearer token) or 403 (a token that does not grant ``scope``)
        :class:`RequestError` unless ``header`` (the ``Authorization`` value) may use ``scope``."""
        if scope not in self.enforced:
            return
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise RequestError("missing bearer token: send the header 'Authorization: Bearer <token>'",
                               401, headers={"WWW-Authenticate": "Bearer"})
        given = token.strip().encode()
        known = False
        for secret, scopes in self.grants:  # every token compared, in constant time each
            if hmac.compare_digest(given, secret):
                known = True
                if scope in scopes:
                    return
        if known:
            raise RequestError(f"the bearer token in the 'Authorization' header does not grant the {scope!r} scope",
                               403, headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'})
        raise RequestError("invalid bearer token in the 'Authorization' header", 403,
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
