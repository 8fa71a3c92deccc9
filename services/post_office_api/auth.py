"""Realm authentication and the capability table of SPEC "Post Office HTTP API".

A caller presents ``Authorization: Bearer <realm key>``; the key names a realm, and the realm
holds capabilities. Routes declare the capabilities that allow them (any one suffices: publishing
to a channel accepts ``agent_channel_publish`` or ``agent_messaging``). Keys are compared in
constant time against every configured key, so neither the answer nor its timing says how much
of a wrong key matched or which key it was close to.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import Mapping

__all__ = [
    "PUBLIC_ROUTES",
    "REALM_CAPABILITIES",
    "ROUTE_CAPABILITIES",
    "Capability",
    "RealmKeys",
    "missing_capability",
]


class Capability(enum.StrEnum):
    WEBSOCKET_ENDPOINT = "websocket_endpoint"
    AGENT_MESSAGING = "agent_messaging"
    AGENT_CHANNEL_PUBLISH = "agent_channel_publish"
    AGENT_CHANNEL_SUBSCRIBE = "agent_channel_subscribe"
    CONNECTION_MESSAGING = "connection_messaging"


REALM_CAPABILITIES: Mapping[str, frozenset[Capability]] = {
    "smart_city": frozenset(Capability),
    "experience": frozenset({Capability.WEBSOCKET_ENDPOINT, Capability.AGENT_MESSAGING}),
    "business_enablement": frozenset(
        {
            Capability.AGENT_CHANNEL_PUBLISH,
            Capability.AGENT_CHANNEL_SUBSCRIBE,
            Capability.CONNECTION_MESSAGING,
        }
    ),
}


#: Route name (also the OpenAPI ``operationId``) -> capabilities that allow it; any one
#: suffices. A ``/v1`` route missing here is refused to every realm: forgetting an entry fails
#: closed.
ROUTE_CAPABILITIES: Mapping[str, frozenset[Capability]] = {
    "get_websocket_endpoint": frozenset({Capability.WEBSOCKET_ENDPOINT}),
    "publish_to_channel": frozenset({Capability.AGENT_CHANNEL_PUBLISH, Capability.AGENT_MESSAGING}),
    "subscribe_to_channel": frozenset({Capability.AGENT_CHANNEL_SUBSCRIBE}),
    "consume_group": frozenset({Capability.AGENT_CHANNEL_SUBSCRIBE}),
    "ack_group": frozenset({Capability.AGENT_CHANNEL_SUBSCRIBE}),
    "list_dead_letters": frozenset({Capability.AGENT_CHANNEL_SUBSCRIBE}),
    "requeue_dead_letters": frozenset({Capability.AGENT_CHANNEL_SUBSCRIBE}),
    "send_to_connection": frozenset({Capability.CONNECTION_MESSAGING}),
    "get_connection": frozenset({Capability.CONNECTION_MESSAGING}),
    "close_connection": frozenset({Capability.CONNECTION_MESSAGING}),
    "send_to_user": frozenset({Capability.CONNECTION_MESSAGING}),
    "broadcast_to_channel": frozenset({Capability.CONNECTION_MESSAGING}),
}

#: Routes under ``/v1`` that need no realm key.
PUBLIC_ROUTES = frozenset({"get_openapi"})


def missing_capability(realm: str, route: str) -> str | None:
    """None when ``realm`` may call ``route``; else the capability to name in the 403."""
    allowed = ROUTE_CAPABILITIES.get(route)
    if not allowed:
        return "none configured for this route"
    held = REALM_CAPABILITIES.get(realm, frozenset())
    if held & allowed:
        return None
    return " or ".join(sorted(allowed))


def _digest(value: str) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of key lengths.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class RealmKeys:
    """The configured keys, held as digests; :meth:`realm_for` finds the caller's realm."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._entries = [(_digest(key), realm) for key, realm in keys.items()]

    def realm_for(self, presented: str) -> str | None:
        given = _digest(presented)
        found: str | None = None
        for digest, realm in self._entries:
            # No early exit: every key is compared whatever matches.
            if hmac.compare_digest(given, digest):
                found = realm
        return found
