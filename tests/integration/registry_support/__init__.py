"""Reusable helpers for tests against a real registry: TLS CA, token server, fault proxy, images."""
