"""Bearer tokens per line and role, shared by the ingest and results edges.

A token list comes from ``FAULTLINE_TOKENS_FILE`` (YAML or JSON) or
``FAULTLINE_TOKENS`` (JSON)::

    tokens:
      - token: "s3cret-ingest"        # or sha256: <hex digest of the token>
        roles: [ingest]               # ingest | view | admin
        lines: [line-1, line-2]       # or ["*"] for every line

``admin`` grants every role. Without any token list the edges run open and
log a warning once. Tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, FaultlineError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

Role = Literal["ingest", "view", "admin"]
ROLES: tuple[str, ...] = ("ingest", "view", "admin")


class AuthError(FaultlineError):
    """Missing (401) or insufficient (403) credentials."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Grant:
    digest: bytes
    roles: frozenset[str]
    lines: frozenset[str]
    name: str

    def allows(self, role: str, line: str | None) -> bool:
        if role not in self.roles and "admin" not in self.roles:
            return False
        return line is None or "*" in self.lines or line in self.lines


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def _grant(entry: dict[str, Any], index: int, source: str) -> Grant:
    where = f"token entry {index} in {source}"
    if "token" in entry:
        digest = _digest(str(entry["token"]))
    elif "sha256" in entry:
        try:
            digest = bytes.fromhex(str(entry["sha256"]))
        except ValueError:
            raise ConfigError(f"{where}: sha256 is not a hex digest") from None
    else:
        raise ConfigError(f"{where}: give 'token' or 'sha256'")
    roles = frozenset(str(r) for r in entry.get("roles", []))
    unknown = roles - set(ROLES)
    if not roles or unknown:
        raise ConfigError(f"{where}: roles {sorted(roles)} invalid; use {', '.join(ROLES)}")
    lines = frozenset(str(x) for x in entry.get("lines", ["*"]))
    return Grant(digest, roles, lines, str(entry.get("name", f"token-{index}")))


class TokenStore:
    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants
        self.enabled = bool(grants)
        if not self.enabled:
            log.warning("no tokens configured (FAULTLINE_TOKENS_FILE): the edge accepts every request")

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenStore:
        inline = settings.tokens.get_secret_value()
        if settings.tokens_file is not None:
            path = settings.tokens_file.expanduser()
            if not path.is_file():
                raise ConfigError(f"FAULTLINE_TOKENS_FILE {str(path)!r} not found")
            document = yaml.safe_load(path.read_text()) or {}
            source = str(path)
        elif inline:
            try:
                document = json.loads(inline)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"FAULTLINE_TOKENS is not valid JSON: {exc.msg}") from None
            source = "FAULTLINE_TOKENS"
        else:
            return cls([])
        entries = document.get("tokens") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: expected a 'tokens' list")
        return cls([_grant(entry, i, source) for i, entry in enumerate(entries)])

    def check(self, authorization: str | None, role: str, line: str | None = None) -> str:
        """Return the grant's name, or raise AuthError (401 or 403)."""
        if not self.enabled:
            return "anonymous"
        token = _bearer(authorization)
        digest = _digest(token)
        match = None
        for grant in self.grants:
            # Compare against every grant so timing does not reveal which matched.
            if hmac.compare_digest(grant.digest, digest):
                match = grant
        if match is None:
            raise AuthError(401, "bearer token is invalid")
        if not match.allows(role, line):
            target = f"line {line!r}" if line else "this resource"
            raise AuthError(403, f"token {match.name!r} has no {role} right on {target}")
        return match.name


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise AuthError(401, "missing Authorization header: send 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "Authorization header must be 'Bearer <token>'")
    return token.strip()
