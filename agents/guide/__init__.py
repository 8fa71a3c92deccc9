"""The demo guide agent: answers every message on the ``guide`` channel (docs/agent-client.md)."""
