"""The Post Office gateway: the only WebSocket ingress, ``/ws`` (docs/protocol.md)."""
