"""LoRA targets on any HF causal LM: the default [all-linear, lm_head] adapts every linear layer of the blocks
plus the LM head of GPT-2, Gemma, Qwen2, Phi-3, Mistral and Llama shapes (tiny, built from their config
classes), resolves to exactly the old explicit list on the Llama-shaped SmolLM2, and a bad name is one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config
from transformers.pytorch_utils import Conv1D

from ktm.base import base_skeleton, byte_tokenizer
from ktm.errors import KTMError
from ktm.model import (DEFAULT_LORA_TARGETS, LLAMA_LORA_TARGETS, KTMModel, LoraSettings, check_settings,
                       lora_target_paths, resolve_lora_targets, same_lora_targets)

TOK = byte_tokenizer()
IDS = dict(vocab_size=len(TOK), pad_token_id=TOK.pad_token_id, eos_token_id=TOK.eos_token_id, bos_token_id=TOK.eos_token_id)
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             max_position_embeddings=256, **IDS)
# Tied heads (GPT-2, Gemma, Qwen2 as in Qwen2.5-0.5B, Llama as in SmolLM2) and untied ones (Phi-3, Mistral).
CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=256, **IDS),
    "gemma": lambda: GemmaConfig(**SMALL, head_dim=16),
    "qwen2": lambda: Qwen2Config(**SMALL, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**SMALL, original_max_position_embeddings=256),
    "mistral": lambda: MistralConfig(**SMALL, tie_word_embeddings=False),
    "llama": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
}
PROMPTS = ["Tree: ab\n+cd, Answer: ", "hello there, a longer prompt"]


def bare(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch]()).eval()


def wrapped(arch: str, **kw) -> KTMModel:
    """A KTMModel on that base with the default LoRA settings (as `ktm fit` builds it), seeded."""
    return KTMModel(bare(arch), TOK, ks=[1, 2], lora=LoraSettings(**kw))


def adapted(model: KTMModel) -> set[str]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    prefix = "base_model.model."
    return {name.removeprefix(prefix) for name, mod in model.lm.named_modules() if isinstance(mod, BaseTunerLayer)}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_the_default_adapts_every_block_linear_and_the_head(arch):
    base = bare(arch)
    linear = {n for n, mod in base.named_modules() if isinstance(mod, (nn.Linear, Conv1D))}
    head = next(n for n, mod in base.named_modules() if mod is base.get_output_embeddings())
    assert head in linear and len(linear) > 1
    model = wrapped(arch)
    assert adapted(model) == linear  # every projection of every block + the head, nothing else
    assert model.metadata()["lora"]["target_modules"] == model.lora_settings.target_modules  # the resolved names
    # peft's own all-linear leaves the head out: [all-linear] is exactly that.
    assert adapted(wrapped(arch, target_modules=["all-linear"])) == linear - {head}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_training_step_touches_only_lora_and_encoders(arch):
    model = wrapped(arch, dropout=0.0).train()
    embed_before = model.embed.weight.detach().clone()
    tied = model.lm.get_output_embeddings()
    tied = getattr(tied, "base_layer", tied).weight.data_ptr() == model.embed.weight.data_ptr()
    assert tied == bool(CONFIGS[arch]().tie_word_embeddings)
    base_before = {n: p.detach().clone() for n, p in model.lm.named_parameters() if "lora_" not in n}
    ids = model.tokenize_prompts(PROMPTS)
    batch = model.build_batch(ids, 2, model.tokenize_targets(["yes", "no"]))
    nll, counts, _ = model.target_nll(batch)
    (nll.sum() / counts.sum()).backward()
    trainable = model.trainable_parameters()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad and all("lora_" in n or n.startswith("encoders.") for n in got_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable["lora"])  # lora_B (A sees B = 0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable["encoder"])
    assert all(not p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(trainable["lora"] + trainable["encoder"], lr=1e-2)
    opt.step()
    assert torch.equal(model.embed.weight, embed_before)  # the table the merge encoder reads is the base's
    assert all(torch.equal(p, base_before[n]) for n, p in model.lm.named_parameters() if "lora_" not in n)
    if tied:  # the head still shares the (unchanged) table; its LoRA is a separate branch
        head = model.lm.get_output_embeddings()
        assert head.base_layer.weight.data_ptr() == model.embed.weight.data_ptr()


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_at_init_the_model_is_the_bare_base(arch):
    """LoRA B = 0 and the encoder's mean init: K=1 gives the bare base's logits on the tokens (each prompt alone,
    unpadded, by input_ids), K=2 the bare base's on the block means."""
    model = wrapped(arch).eval()
    reference = bare(arch)
    ids = model.tokenize_prompts(PROMPTS)
    with torch.no_grad():
        batch = model.build_batch(ids, 1)
        logits = model(batch).logits
        for i, row in enumerate(ids):
            expected = reference(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(logits[i, -len(row):], expected, atol=1e-5, rtol=1e-5)
        batch = model.build_batch(ids, 2)
        logits = model(batch).logits
        for i, row in enumerate(ids):
            emb = reference.get_input_embeddings()(torch.tensor(row))
            head = len(row) % 2
            merged = torch.cat([emb[:head], emb[head:].reshape(-1, 2, emb.shape[-1]).mean(1)])
            expected = reference(inputs_embeds=merged[None]).logits[0]
            torch.testing.assert_close(logits[i, -merged.shape[0]:], expected, atol=1e-5, rtol=1e-5)


# -- SmolLM2 / Llama: the new default is the old explicit list ---------------------------------------


def smollm2_skeleton() -> nn.Module:
    """SmolLM2-135M-Instruct's shape (the embedded default base, a tied Llama), on the meta device."""
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def test_the_default_resolves_to_the_old_llama_list():
    assert list(LoraSettings().target_modules) == list(DEFAULT_LORA_TARGETS) == ["all-linear", "lm_head"]
    for base in (smollm2_skeleton(), bare("llama")):
        assert resolve_lora_targets(base, DEFAULT_LORA_TARGETS) == list(LLAMA_LORA_TARGETS)
        assert resolve_lora_targets(base, LLAMA_LORA_TARGETS) == list(LLAMA_LORA_TARGETS)  # explicit lists: as written
    # What a resume check needs (base config only, no weights): the two spellings adapt the same layers.
    assert same_lora_targets("config:tiny-llama", LLAMA_LORA_TARGETS, DEFAULT_LORA_TARGETS)
    assert same_lora_targets("config:tiny-llama", ["v_proj", "q_proj"], ["q_proj", "v_proj"])
    assert not same_lora_targets("config:tiny-llama", LLAMA_LORA_TARGETS, ["all-linear"])
    assert not same_lora_targets("config:qwen2.5-0.5b", ["q_proj", "v_proj"], ["all-linear"])
    state = torch.random.get_rng_state()
    base_skeleton("config:qwen2.5-7b")  # no weights, so no random draws: a resume check leaves the seeded stream alone
    assert torch.equal(torch.random.get_rng_state(), state)


def test_old_and_new_spelling_build_the_same_adapter_and_share_exports(tmp_path):
    """Same modules, same LoRA shapes and (same seed) the same initial weights; an export made with the old
    explicit list starts a new-default run (model.init_from), and one made with the new default loads."""
    from ktm.training.init_from import load_trained_weights

    def build(targets):
        torch.manual_seed(0)
        return KTMModel.from_base("config:tiny-llama", ks=[1, 2], lora=LoraSettings(target_modules=list(targets)))

    old, new = build(LLAMA_LORA_TARGETS), build(DEFAULT_LORA_TARGETS)
    assert adapted(old) == adapted(new) == lora_target_paths(bare("llama"), DEFAULT_LORA_TARGETS)
    assert old.metadata() == new.metadata()  # ktm.json records the resolved names: identical
    old_state = {n: p for n, p in old.lm.named_parameters() if "lora_" in n}
    new_state = {n: p for n, p in new.lm.named_parameters() if "lora_" in n}
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[n], new_state[n]) for n in old_state)
    with torch.no_grad():
        for p in old_state.values():
            p.add_(0.01)
    old.save(tmp_path / "old")
    assert load_trained_weights(new, tmp_path / "old") == [2]
    assert all(torch.equal(old_state[n], new_state[n]) for n in old_state)
    new.save(tmp_path / "new")
    loaded = KTMModel.from_pretrained(tmp_path / "new")
    assert loaded.lora_settings.target_modules == list(LLAMA_LORA_TARGETS)
    assert adapted(loaded) == adapted(new)


# -- errors -------------------------------------------------------------------------------------------


def test_a_name_the_base_lacks_is_one_line_naming_its_layers():
    with pytest.raises(KTMError) as err:
        wrapped("gpt2", target_modules=["q_proj", "v_proj", "lm_head"])  # Llama names on GPT-2
    msg = str(err.value)
    assert "\n" not in msg
    assert "has 'q_proj', 'v_proj', but base 'gpt2' has no layers of those names" in msg
    assert "names of its linear layers: c_attn, c_proj, c_fc, lm_head" in msg and "[all-linear, lm_head]" in msg


def test_targets_that_are_not_adaptable_layers_are_refused():
    with pytest.raises(KTMError, match=r"'embed_tokens', the input embedding table \(model.embed_tokens\)"):
        wrapped("llama", target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(KTMError, match=r"selects model.layers.0.mlp, a LlamaMLP: not a layer LoRA can adapt"):
        wrapped("llama", target_modules=["model.layers.0.mlp"])


@pytest.mark.parametrize("targets,message", [
    ("all-linear", "model.lora.target_modules is the string 'all-linear', ktm takes a list"),
    ("q_proj", "model.lora.target_modules must be a non-empty list, got 'q_proj'"),
    ([], "model.lora.target_modules must be a non-empty list, got []"),
    (["q_proj", ""], "model.lora.target_modules has '', not a layer name"),
])
def test_target_spelling_is_checked_before_any_base(targets, message):
    with pytest.raises(KTMError) as err:
        check_settings([1, 2], lora=LoraSettings(target_modules=targets))
    assert message in str(err.value) and "[all-linear, lm_head]" in str(err.value)


def test_bare_all_linear_on_the_command_line_is_one_line(capsys):
    from ktm.cli import main

    argv = ["fit", "--exp", "tree_k4", "--model.base=config:tiny-llama", "--model.ks=[1,4]", "--data.k_schedule=[1,4]",
            "--model.lora.target_modules=all-linear"]
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ktm: error:")]
    assert len(lines) == 1 and "is the string 'all-linear', ktm takes a list" in lines[0]
    assert "write [all-linear, lm_head]" in lines[0]
