"""Shoal server."""
