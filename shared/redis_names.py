"""Every Redis key and pub/sub channel name Post Office uses, built in one place.

No other module spells a key or channel literal: services call these builders, and
``tests/test_redis_names.py`` pins each format, so a rename is one change here and a failing
test there. Each builder's comment shows the shape it produces.
"""

from __future__ import annotations

__all__ = [
    "EPOCH",
    "EVENTS",
    "GATEWAYS",
    "LAST_SEEN",
    "SESSION_REVOCATIONS",
    "agent_channel",
    "channel_broadcast",
    "channel_connections",
    "connection",
    "connection_messages",
    "dead_letters",
    "gateway_connections",
    "gateway_control",
    "gateway_instance",
    "session",
    "session_by_id",
    "session_connections",
    "session_of_connection",
    "stream",
    "stream_consumers",
    "user_connections",
]

_PREFIX = "websocket"

# websocket:epoch — string, no TTL: a random value written with SET NX by the first process
# that finds it missing (shared.epoch). It changing or vanishing means Redis lost its data.
EPOCH = f"{_PREFIX}:epoch"

# websocket:events — pub/sub: connected, disconnected, evicted (with reason)
EVENTS = f"{_PREFIX}:events"

# websocket:connections:last_seen — sorted set: connection id scored by its last activity
# (unix seconds). The eviction worker reads only the stale end of it instead of scanning keys.
LAST_SEEN = f"{_PREFIX}:connections:last_seen"

# websocket:gateways — set: every gateway instance that registered and has not been cleaned up
GATEWAYS = f"{_PREFIX}:gateways"

# session:revocations — pub/sub: {"session_id": ...} when Traffic Cop revokes a session
SESSION_REVOCATIONS = "session:revocations"


def agent_channel(channel: str) -> str:
    """websocket:<channel> — pub/sub: the live tap, every client message for agents on that
    logical channel as it is appended to :func:`stream` (at most once; observers, simple
    listeners). Durable, competing delivery is the stream's consumer groups."""
    return f"{_PREFIX}:{channel}"


def connection(connection_id: str) -> str:
    """websocket:connection:<id> — hash with TTL: the connection's registry record."""
    return f"{_PREFIX}:connection:{connection_id}"


def connection_messages(connection_id: str) -> str:
    """websocket:connection:<id>:messages — pub/sub: frames for that connection, from anyone."""
    return f"{_PREFIX}:connection:{connection_id}:messages"


def user_connections(user_id: str) -> str:
    """websocket:user:<user_id>:connections — set: a user's connection ids."""
    return f"{_PREFIX}:user:{user_id}:connections"


def channel_connections(channel: str) -> str:
    """websocket:channel:<channel>:connections — set: connections that used the channel."""
    return f"{_PREFIX}:channel:{channel}:connections"


def channel_broadcast(channel: str) -> str:
    """websocket:channel:<channel>:broadcast — pub/sub: one frame for every connection that used
    the channel; every gateway subscribes and fans out locally, so a broadcast is one PUBLISH."""
    return f"{_PREFIX}:channel:{channel}:broadcast"


def gateway_instance(instance: str) -> str:
    """websocket:gateway:<instance> — string with TTL: the instance is alive while it exists."""
    return f"{_PREFIX}:gateway:{instance}"


def gateway_connections(instance: str) -> str:
    """websocket:gateway:<instance>:connections — set: connection ids the instance holds."""
    return f"{_PREFIX}:gateway:{instance}:connections"


def gateway_control(instance: str) -> str:
    """websocket:gateway:<instance>:control — pub/sub: commands for one gateway (close a socket)."""
    return f"{_PREFIX}:gateway:{instance}:control"


# The keys one script touches together share a Redis Cluster hash tag: the channel in braces.
# A publish touches the stream (and the tap, a pub/sub channel: no slot); a reclaim, a dead
# letter and a re-queue touch the stream and its dead-letter stream.


def stream(channel: str) -> str:
    """websocket:stream:{<channel>} — stream: every accepted client message for agents on the
    channel (field ``data``: the agent message JSON). Agents consume it through consumer groups
    (XREADGROUP/XACK); nothing a group has not acked is trimmed."""
    return f"{_PREFIX}:stream:{{{channel}}}"


def stream_consumers(channel: str) -> str:
    """websocket:consumers:{<channel>} — sorted set: ``<group>/<consumer>`` scored by the unix
    time it last asked for messages. Redis before 7.2 does not refresh a consumer's idle time
    on a read that finds nothing, so a quiet but live consumer says so here (the API's group
    streams do; raw-Redis consumers on Redis 7.0/7.1 ZADD it themselves)."""
    return f"{_PREFIX}:consumers:{{{channel}}}"


def dead_letters(channel: str) -> str:
    """websocket:dead:{<channel>} — stream: messages of the channel that a group did not ack
    within MAX_DELIVERIES deliveries (fields data, stream_id, group, deliveries, reason,
    dead_at)."""
    return f"{_PREFIX}:dead:{{{channel}}}"


def session(token_hash: str) -> str:
    """session:<sha256 of token> — hash with TTL: Traffic Cop's session."""
    return f"session:{token_hash}"


def session_connections(session_id: str) -> str:
    """session:<session_id>:connections — set with TTL: connections opened with the session."""
    return f"session:{session_id}:connections"


def session_by_id(session_id: str) -> str:
    """session:id:<session_id> — string with TTL: the sha256 of the session's token, so calls
    that know only the session id (connection registration) find the session."""
    return f"session:id:{session_id}"


def session_of_connection(connection_id: str) -> str:
    """session:connection:<connection_id> — string with the session's TTL: the session id a
    connection was registered against (Traffic Cop's bookkeeping, so unregistering needs only
    the connection id, and an entry never outlives its session)."""
    return f"session:connection:{connection_id}"
