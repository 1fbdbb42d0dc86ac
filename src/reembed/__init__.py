"""reembed: re-embed a document corpus with a new embedding model on Ray."""

__version__ = "0.1.0"
