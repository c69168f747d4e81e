"""Shoal server."""

import os

# faiss's OpenMP threads otherwise spin for a while after each parallel region, waiting for the
# next one: with a search thread per core and the event loop beside them, that spinning takes
# the CPU the loop needs (README, "Index kinds"). It must be set before faiss is first imported
# (libgomp reads it once); a setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
