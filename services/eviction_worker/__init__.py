"""The eviction worker: evicts idle connections, cleans up after dead gateways, drains the
agent-channel queues. ``python -m services.eviction_worker``; see docs/eviction.md."""
