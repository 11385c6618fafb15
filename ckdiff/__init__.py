"""ckdiff: a verification-first harness for LLM checkpoint converters."""

__version__ = "0.1.0"
