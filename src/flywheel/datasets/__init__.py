"""Datasets: immutable, content-hashed versions of items; import, export, quality."""
