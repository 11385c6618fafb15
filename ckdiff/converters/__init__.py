"""Checkpoint formats (readers, writers) and the converters between them."""
