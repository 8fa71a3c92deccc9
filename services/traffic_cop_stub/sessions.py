"""Sessions and connection bookkeeping in Redis: every write that touches several keys is one
MULTI or one Lua script, so a revocation racing a registration cannot leave a connection tied
to a session that no longer exists.

Layout (names from :mod:`shared.redis_names`):

* ``session:<sha256 of token>`` — hash with the session's TTL: session_id, user_id,
  created_at, expires_at (unix seconds), metadata (JSON). The token itself is never stored.
* ``session:id:<session_id>`` — the token hash, same TTL: connection registration knows only
  the session id.
* ``session:<session_id>:connections`` — set of connection ids, and
  ``session:connection:<connection_id>`` — the session id, both with the session's remaining
  TTL, so no bookkeeping outlives its session even when nobody unregisters the connection.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from shared import redis_names as names

__all__ = ["NewSession", "Registration", "Session", "SessionStore", "hash_token"]

_T = "{}"  # the placeholder the scripts substitute (see shared.registry)

_REGISTER = """
-- KEYS: 1 session-by-id key, 2 session connection set, 3 the connection's session key.
-- ARGV: 1 session hash template, 2 session id, 3 user id, 4 connection id.
-- Returns 1 registered, 0 session gone, -1 session belongs to another user.
local token_hash = redis.call('GET', KEYS[1])
if not token_hash then return 0 end
local session = (string.gsub(ARGV[1], '{}', token_hash))
local f = redis.call('HMGET', session, 'session_id', 'user_id')
if f[1] ~= ARGV[2] then return 0 end
if f[2] ~= ARGV[3] then return -1 end
local ttl = redis.call('PTTL', session)
if ttl == -2 then return 0 end
redis.call('SADD', KEYS[2], ARGV[4])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ttl)
else
  redis.call('SET', KEYS[3], ARGV[2])
end
return 1
"""

_REVOKE = """
-- KEYS: 1 session hash, 2 revocations channel.
-- ARGV: 1 session-by-id template, 2 session connection set template,
--       3 connection's session key template.
-- Returns the revoked session id, or false when the session does not exist.
local sid = redis.call('HGET', KEYS[1], 'session_id')
if not sid then return false end
local conns = (string.gsub(ARGV[2], '{}', sid))
for _, id in ipairs(redis.call('SMEMBERS', conns)) do
  local key = (string.gsub(ARGV[3], '{}', id))
  if redis.call('GET', key) == sid then redis.call('DEL', key) end
end
redis.call('DEL', KEYS[1], (string.gsub(ARGV[1], '{}', sid)), conns)
redis.call('PUBLISH', KEYS[2], cjson.encode({session_id = sid}))
return sid
"""

_UNREGISTER = """
-- KEYS: 1 the connection's session key.  ARGV: 1 session connection set template,
-- 2 connection id.  Returns 1 removed, 0 unknown.
local sid = redis.call('GET', KEYS[1])
if not sid then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SREM', (string.gsub(ARGV[1], '{}', sid)), ARGV[2])
return 1
"""


def hash_token(token: str) -> str:
    """sha256 hex of a token: the only form in which a token reaches Redis."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_session_id() -> str:
    return f"sess_{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    user_id: str
    created_at: float
    expires_at: float
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewSession:
    token: str
    session: Session


class Registration(enum.IntEnum):
    """Outcome of :meth:`SessionStore.register_connection` (the script's return codes)."""

    REGISTERED = 1
    SESSION_GONE = 0
    WRONG_USER = -1


class SessionStore:
    """Session operations on one Redis client. Cheap to build; holds no state but scripts."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._register = redis.register_script(_REGISTER)
        self._revoke = redis.register_script(_REVOKE)
        self._unregister = redis.register_script(_UNREGISTER)

    async def create(
        self, user_id: str, ttl_seconds: int, metadata: dict[str, Any], now: float | None = None
    ) -> NewSession:
        now = time.time() if now is None else now
        token = secrets.token_urlsafe(32)
        token_hash = hash_token(token)
        session = Session(
            session_id=new_session_id(),
            user_id=user_id,
            created_at=now,
            expires_at=now + ttl_seconds,
            metadata=metadata,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                names.session(token_hash),
                mapping={
                    "session_id": session.session_id,
                    "user_id": user_id,
                    "created_at": repr(session.created_at),
                    "expires_at": repr(session.expires_at),
                    "metadata": orjson.dumps(metadata),
                },
            )
            pipe.expire(names.session(token_hash), ttl_seconds)
            pipe.set(names.session_by_id(session.session_id), token_hash, ex=ttl_seconds)
            await pipe.execute()
        return NewSession(token=token, session=session)

    async def validate(self, token: str, now: float | None = None) -> Session | None:
        """The live session behind ``token``, or ``None`` (unknown, expired or revoked)."""
        # The client is built with decode_responses=False: keys and values are bytes.
        raw = cast("dict[bytes, bytes]", await self.redis.hgetall(names.session(hash_token(token))))
        if not raw:
            return None
        try:
            session = Session(
                session_id=raw[b"session_id"].decode(),
                user_id=raw[b"user_id"].decode(),
                created_at=float(raw[b"created_at"]),
                expires_at=float(raw[b"expires_at"]),
                metadata=orjson.loads(raw.get(b"metadata", b"{}")),
            )
        except (KeyError, ValueError):
            # A half-written or foreign hash is not a session; refusing it is the safe answer.
            return None
        # Redis expires keys lazily to the millisecond; the recorded deadline is authoritative.
        if session.expires_at <= (time.time() if now is None else now):
            return None
        return session

    async def revoke(self, token: str) -> str | None:
        """Delete the session, its connection bookkeeping, and announce it; its id, or ``None``."""
        result = await self._revoke(
            keys=[
                names.session(hash_token(token)),
                names.SESSION_REVOCATIONS,
            ],
            args=[
                names.session_by_id(_T),
                names.session_connections(_T),
                names.session_of_connection(_T),
            ],
        )
        if result is None:
            return None
        return result.decode() if isinstance(result, bytes) else str(result)

    async def register_connection(
        self, connection_id: str, session_id: str, user_id: str
    ) -> Registration:
        result = await self._register(
            keys=[
                names.session_by_id(session_id),
                names.session_connections(session_id),
                names.session_of_connection(connection_id),
            ],
            args=[names.session(_T), session_id, user_id, connection_id],
        )
        return Registration(int(result))

    async def unregister_connection(self, connection_id: str) -> bool:
        result = await self._unregister(
            keys=[names.session_of_connection(connection_id)],
            args=[names.session_connections(_T), connection_id],
        )
        return bool(result)
