"""Annotation readers, feature stores and the embedded demo corpus."""
