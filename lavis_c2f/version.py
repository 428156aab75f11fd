"""The package version (read by the index manifest without importing the whole package)."""
__version__ = "0.1.0"
