"""Integration tests: real server processes, real clients, real redis-server."""
