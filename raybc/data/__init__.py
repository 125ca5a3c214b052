"""Data sets: synthetic embedding tables and registries (and, with training, interaction data)."""
