"""ktm: K-Token Merging for causal LMs (merge every K prompt-token embeddings into one)."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import ktm` stays cheap, `ktm.KTMModel` loads torch on first use
    if name in ("KTMModel", "LoraSettings"):
        from ktm import model

        return getattr(model, name)
    if name == "MergeEncoder":
        from ktm.encoder import MergeEncoder

        return MergeEncoder
    raise AttributeError(name)
