"""The eviction worker: evicts idle connections, cleans up after dead gateways, reclaims unacked
agent-stream messages. ``python -m services.eviction_worker``; see docs/eviction.md."""
