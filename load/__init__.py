"""Shoal load."""
