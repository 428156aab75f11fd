"""Small shared helpers: atomic file I/O, errors, distributed/device utilities."""
