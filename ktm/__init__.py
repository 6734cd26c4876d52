"""ktm: K-Token Merging for causal LMs (merge every K prompt-token embeddings into one)."""

__version__ = "0.1.0"
