"""Logins and tokens: argon2 password hashes, signed JWTs, a deny-list and login limits in Redis.

- Passwords: argon2id (argon2-cffi). ``botd console passwd`` writes the hash into config.toml;
  a login checks the password against it (an unknown user name costs the same time).
- Tokens: HS256 JWTs (PyJWT) signed with ``[console] signing_key``. Two audiences that never
  stand in for each other: ``botd-console`` (a console login, in a cookie) and ``botd-api``
  (a bearer token for the HTTP API, naming the bots it may use; ``botd token issue``).
- Revocation: a token's ``jti`` goes on a deny-list in Redis until the token would have
  expired anyway (logout). A token is refused while Redis cannot say it is not revoked.
- Login attempts are counted in Redis per user name and per client address, in fixed windows;
  each attempt is counted before the password is checked, so parallel guesses count too.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from core.errors import BotdError
from core.kv import KeyValueCache

CONSOLE_AUDIENCE = "botd-console"
API_AUDIENCE = "botd-api"
ISSUER = "botd"
_ALGORITHM = "HS256"

_hasher = PasswordHasher()
# Checked when the user name is unknown, so that the answer takes as long as for a known one.
_DUMMY_HASH = _hasher.hash("botd: no such user")


class AuthError(BotdError):
    """A token or a login that is not accepted; ``reason`` is short and safe to show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyAttempts(AuthError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many login attempts; try again in {retry_after} s")
        self.retry_after = retry_after


# -- passwords ----------------------------------------------------------------------------


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; ``None`` (no such user) checks a dummy hash and is False."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# -- tokens -------------------------------------------------------------------------------


class Tokens:
    """Issues and checks the JWTs signed with one key."""

    def __init__(self, key: str) -> None:
        self._key = key

    def issue(self, subject: str, audience: str, ttl_s: int, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": audience, "sub": subject, "iat": now, "exp": now + ttl_s,
                   "jti": uuid.uuid4().hex, **claims}
        return jwt.encode(payload, self._key, algorithm=_ALGORITHM)

    def decode(self, token: str, audience: str) -> dict[str, Any]:
        """The claims of a valid token for ``audience``; :class:`AuthError` otherwise."""
        try:
            claims = jwt.decode(token, self._key, algorithms=[_ALGORITHM], audience=audience, issuer=ISSUER,
                                options={"require": ["exp", "iat", "sub", "jti", "aud", "iss"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("the token has expired") from None
        except jwt.PyJWTError:
            raise AuthError("the token is not valid") from None
        if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("jti"), str):
            raise AuthError("the token is not valid")
        return claims

    def csrf(self, jti: str) -> str:
        """The CSRF token that goes with one login (derived, so nothing is stored)."""
        return hmac.new(self._key.encode(), b"csrf:" + jti.encode(), hashlib.sha256).hexdigest()[:32]

    def csrf_ok(self, jti: str, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(self.csrf(jti).encode(), (given or "").encode(errors="replace"))


def looks_like_jwt(value: str) -> bool:
    parts = value.split(".")
    return len(parts) == 3 and all(parts) and value.startswith("eyJ")


class DenyList:
    """Revoked token ids, kept in Redis until the tokens would have expired."""

    def __init__(self, cache: KeyValueCache) -> None:
        self.cache = cache

    async def revoke(self, jti: str, exp: int) -> None:
        await self.cache.set(f"auth:revoked:{jti}", "1", ttl_s=max(1, exp - int(time.time()) + 60))

    async def revoked(self, jti: str) -> bool:
        """Raises :class:`~core.redis_store.StoreUnavailable` when Redis cannot tell."""
        return await self.cache.get(f"auth:revoked:{jti}") is not None


class LoginLimiter:
    """At most ``attempts`` logins per user name (and ``4 * attempts`` per client address) per window."""

    def __init__(self, cache: KeyValueCache, attempts: int, window_s: int) -> None:
        self.cache = cache
        self.attempts = attempts
        self.window_s = window_s

    def _keys(self, user: str, client: str) -> list[tuple[str, int]]:
        digest = hashlib.sha256(user.encode(errors="replace")).hexdigest()[:16]
        return [(f"{self.cache.prefix}:auth:login:user:{digest}", self.attempts),
                (f"{self.cache.prefix}:auth:login:addr:{client}", 4 * self.attempts)]

    async def attempt(self, user: str, client: str) -> None:
        """Count one attempt; :class:`TooManyAttempts` when over a limit (raises
        :class:`~core.redis_store.StoreUnavailable` when Redis cannot count)."""
        redis = self.cache.redis
        for key, limit in self._keys(user, client):

            async def count(key: str = key) -> tuple[int, int]:
                async with redis.client.pipeline(transaction=True) as pipe:
                    # The window starts with the first attempt (SET NX EX: Redis 6 has no EXPIRE NX).
                    pipe.set(key, 0, ex=self.window_s, nx=True)
                    pipe.incr(key)
                    pipe.ttl(key)
                    _, n, ttl = await pipe.execute()
                return int(n), int(ttl)

            n, ttl = await redis.run("INCR", count)
            if n > limit:
                raise TooManyAttempts(max(1, ttl))

    async def succeeded(self, user: str, client: str) -> None:
        """A right password clears the user name's count (not the address's)."""
        key = self._keys(user, client)[0][0]
        await self.cache.redis.run("DEL", self.cache.redis.client.delete, key)
