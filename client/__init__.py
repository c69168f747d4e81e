"""Shoal client."""
