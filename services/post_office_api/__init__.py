"""The Post Office HTTP API: the ``/v1`` calls realms and agents use (docs/api.md)."""
