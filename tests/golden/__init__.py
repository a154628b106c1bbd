"""Golden files: seeded outputs of named runs, regenerated only on purpose (see regen.py)."""
