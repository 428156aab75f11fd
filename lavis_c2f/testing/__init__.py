"""Test utilities. Nothing here is imported by ``lavis_c2f/__init__.py``."""
