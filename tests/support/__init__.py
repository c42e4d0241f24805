"""Helpers for tests that start real services (docker-registry, containerd, the daemon)."""
