"""Registered components (imported by lavis_c2f/__init__.py)."""
