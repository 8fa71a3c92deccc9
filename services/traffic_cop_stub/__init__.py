"""Traffic Cop: issues, validates and revokes sessions, and ties WebSocket connections to them.

Sessions live in Redis (only the sha256 of each token is stored); revocations are announced on
``session:revocations`` so every gateway closes that session's sockets. See
docs/architecture.md, "Traffic Cop HTTP API".
"""
