"""Logins and tokens: argon2 password hashes, signed JWTs, a deny-list and login limits in Redis.

- Passwords: argon2id (argon2-cffi). ``botd console passwd`` writes the hash into config.toml;
  a login checks the password against it (an unknown user name costs the same time).
- Tokens: HS256 JWTs (PyJWT) signed with ``[console] signing_key``. Two audiences that never
  stand in for each other: ``botd-console`` (a console login, in a cookie) and ``botd-api``
  (a bearer token for the HTTP API, naming the bots it may use; ``botd token issue``).
- Revocation: a token's ``jti`` goes on a deny-list in Redis until the token would have
  expired anyway (logout). A token is refused while Redis cannot say it is not revoked.
- Login limits in Redis (:class:`LoginLimiter`): password checks per client address (IPv6 by
  /64), counted before the check; wrong passwords per user name and address, counted after it,
  so that nobody can lock a user out from elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
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
    """Login limits in fixed windows, keyed so that a stranger cannot lock the real user out.

    - Per client address (an IPv6 address by its /64, which one host holds whole): at most
      ``4 * attempts`` password checks per window. Counted before the check, so that parallel
      guesses count too (each argon2 check costs 64 MiB); a right password is not counted.
    - Per user name *and* address: at most ``attempts`` wrong passwords. Counted only after the
      password was checked and was wrong, and never shared between addresses: wrong guesses
      for ``admin`` from one address do not stop ``admin`` logging in from another.
    """

    def __init__(self, cache: KeyValueCache, attempts: int, window_s: int) -> None:
        self.cache = cache
        self.attempts = attempts
        self.window_s = window_s

    def _keys(self, user: str, client: str) -> tuple[str, str]:
        group = address_group(client)
        digest = hashlib.sha256(user.encode(errors="replace") + b"\0" + group.encode()).hexdigest()[:16]
        return f"{self.cache.prefix}:auth:login:user:{digest}", f"{self.cache.prefix}:auth:login:addr:{group}"

    async def _count(self, key: str, by: int) -> tuple[int, int]:
        redis = self.cache.redis

        async def count() -> tuple[int, int]:
            async with redis.client.pipeline(transaction=True) as pipe:
                # The window starts with the first attempt (SET NX EX: Redis 6 has no EXPIRE NX).
                pipe.set(key, 0, ex=self.window_s, nx=True)
                pipe.incrby(key, by)
                pipe.ttl(key)
                _, n, ttl = await pipe.execute()
            return int(n), int(ttl)

        return await redis.run("INCR", count)

    async def attempt(self, user: str, client: str) -> None:
        """Before the password check: :class:`TooManyAttempts` when the address or this name
        from this address is over its limit (raises :class:`~core.redis_store.StoreUnavailable`
        when Redis cannot count)."""
        name_key, addr_key = self._keys(user, client)
        n, ttl = await self._count(addr_key, 1)
        if n > 4 * self.attempts:
            raise TooManyAttempts(max(1, ttl))
        redis = self.cache.redis
        failures = await redis.run("GET", redis.client.get, name_key)
        if failures is not None and int(failures) >= self.attempts:
            await self._count(addr_key, -1)  # refused without a password check: costs the address nothing
            ttl = await redis.run("TTL", redis.client.ttl, name_key)
            raise TooManyAttempts(max(1, int(ttl)))

    async def failed(self, user: str, client: str) -> None:
        """The password was checked and was wrong: count it against this name from this address."""
        await self._count(self._keys(user, client)[0], 1)

    async def succeeded(self, user: str, client: str) -> None:
        """A right password clears this name's failures from this address and is not counted
        against the address."""
        name_key, addr_key = self._keys(user, client)
        await self.cache.redis.run("DEL", self.cache.redis.client.delete, name_key)
        await self._count(addr_key, -1)


def address_group(client: str) -> str:
    """The unit a login limit counts: an IPv4 address, or an IPv6 address's /64 network."""
    try:
        addr = ipaddress.ip_address(client)
    except ValueError:
        return client[:64] or "unknown"
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)
