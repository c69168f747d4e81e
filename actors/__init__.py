"""The engine: one module per actor, each the sole owner of its state."""
