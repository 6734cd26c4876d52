"""Compressors (ktm/compressors.py): every method at the merge's length, in order, batch-invariant; the
baselines' own rules (seeded draw, lowest surprisal, block mean); llmlingua2's refusal without its hub."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch import nn

from ktm.base import byte_tokenizer, config_base
from ktm.compressors import REGISTRY, TokenSelector, get_compressor, keep_highest, names
from ktm.errors import KTMError
from ktm.io import write_json
from ktm.model import KTMModel, LoraSettings, block_layout, merged_length

PROMPTS = ["Tree: ab\n+cd, Task: Parent/Child Relationship, Parent: ab, Child: cd, Answer: ",
           "hi", "abc", "abcd", "abcde", "a much longer prompt than the others, with several words in it"]
LOCAL = [n for n in names() if n != "llmlingua2"]  # everything that needs no extra package
SELECTORS = [n for n in LOCAL if issubclass(REGISTRY[n], TokenSelector)]


def _use(model: KTMModel, name: str, **kwargs) -> KTMModel:
    model.compressor = get_compressor(name, **kwargs)
    return model


def _perturb_lora(model: KTMModel) -> None:
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)


def _is_subsequence(small, big) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_registry_has_every_method_and_an_unknown_name_is_one_line():
    assert names() == ["merge", "mean_pool", "none", "truncate_tail", "truncate_head", "random_drop", "self_information",
                       "llmlingua2"]
    with pytest.raises(KTMError) as err:
        KTMModel.from_base("config:tiny-llama", ks=[4], lora=None, compressor="llmlingua")
    msg = str(err.value)
    assert "\n" not in msg and "unknown model.compressor 'llmlingua'" in msg and all(n in msg for n in names())


@pytest.mark.parametrize("keep_tail", [0, 3])
@pytest.mark.parametrize("name", LOCAL)
def test_every_compressor_returns_exactly_the_budget_and_keeps_order(tiny, name, keep_tail):
    tiny.keep_tail = keep_tail
    _use(tiny, name)
    ids = tiny.tokenize_prompts(PROMPTS)
    for k in (1, 2, 4, 8):
        out = tiny.compressor.compress(tiny, ids, k)
        batch = tiny.build_batch(ids, k)
        for p, o, got in zip(ids, out, batch.merged_tokens.tolist()):
            n = len(p)
            want = n if name == "none" else merged_length(n, k, keep_tail)
            assert len(o) == got == want
            if name in SELECTORS:
                tail = block_layout(n, k, keep_tail)[2]
                assert _is_subsequence(o, p) and o[len(o) - tail :] == p[n - tail :]  # order kept, tail verbatim
                if k == 1:
                    assert o == p
        # the LM reads exactly the compressor's output, right-aligned after the left padding
        for i, e in enumerate(tiny.compressor.embeddings(tiny, ids, k)):
            torch.testing.assert_close(batch.inputs_embeds[i, batch.inputs_embeds.shape[1] - len(e) :], e, rtol=0, atol=0)
    assert tiny.metadata()["compressor"] == name


def test_truncations_keep_the_ends_they_say():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[4], lora=None)
    p = list(range(10, 30))  # 20 tokens: K=4 -> 5 positions
    assert _use(m, "truncate_tail").compressor.compress(m, [p], 4) == [p[-5:]]
    assert _use(m, "truncate_head").compressor.compress(m, [p], 4) == [p[:5]]
    m.keep_tail = 3  # 17 body tokens -> head 1 + 4 blocks = 5, plus the 3 tail tokens
    assert _use(m, "truncate_head").compressor.compress(m, [p], 4) == [p[:5] + p[-3:]]
    assert _use(m, "truncate_tail").compressor.compress(m, [p], 4) == [p[-8:]]


def test_random_drop_is_seeded_by_content_and_seed():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[2, 4], lora=None)
    ids = m.tokenize_prompts(PROMPTS)
    a = get_compressor("random_drop").compress(m, ids, 4)
    assert a == get_compressor("random_drop", seed=0).compress(m, ids, 4)  # a fresh instance: the same draw
    assert a == get_compressor("random_drop").compress(m, ids, 4)
    assert [get_compressor("random_drop").compress(m, [p], 4)[0] for p in ids] == a  # alone == in a batch
    assert get_compressor("random_drop").compress(m, ids[::-1], 4) == a[::-1]  # order of the batch is irrelevant
    other = get_compressor("random_drop", seed=1).compress(m, ids, 4)
    long = [i for i, p in enumerate(ids) if len(p) > 40]
    assert long and all(other[i] != a[i] for i in long)  # another seed, another draw
    for i in long:  # neither end of the prompt: a real draw
        assert a[i] not in (ids[i][: len(a[i])], ids[i][-len(a[i]) :])
    twins = m.tokenize_prompts(["abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyZ"])
    x, y = get_compressor("random_drop").compress(m, twins, 2)
    assert x != y  # the draw depends on the content


def test_self_information_drops_exactly_the_lowest_surprisal_tokens():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4], lora=LoraSettings(r=4))
    _perturb_lora(m)  # the LoRA now changes the logits: scoring must switch it off
    _use(m, "self_information")
    prompt = [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33]  # hand-made: 12 tokens
    # Independently: a fresh copy of the same frozen base (config bases are built seeded), no LoRA at all.
    base, _ = config_base("tiny-llama", torch.float32)
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([prompt])).logits[0].double()
        lora_logits = m.lm(input_ids=torch.tensor([prompt])).logits[0].double()
    assert (lora_logits - logits).abs().max() > 1e-2  # the adapter matters, so a forgotten switch would show
    logp = torch.log_softmax(logits, -1)
    surprisal = [float("inf")] + [-float(logp[i - 1, prompt[i]]) for i in range(1, len(prompt))]
    calls = []
    handle = m.lm.register_forward_pre_hook(lambda mod, args: calls.append(1))
    m.train()  # mid-training: the scoring pass runs in eval mode and restores the modes after
    torch.testing.assert_close(m.compressor.surprisal(m, prompt).double()[1:], torch.tensor(surprisal[1:], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    for k in (2, 4):
        want = merged_length(len(prompt), k)
        dropped = sorted(range(len(prompt)), key=lambda i: (surprisal[i], -i))[: len(prompt) - want]  # ties: the later goes
        expected = [t for i, t in enumerate(prompt) if i not in dropped]
        assert m.compressor.compress(m, [prompt], k) == [expected]
        assert m.compressor.compress(m, [prompt], k) == [expected]  # cached: the base never trains
    handle.remove()
    assert len(calls) == 1  # one forward pass per prompt, shared by every budget: the base never trains
    assert m.lm.training and all(mod.training for mod in m.lm.modules())


def test_ties_are_broken_deterministically():
    assert keep_highest([float("inf"), 1.0, 5.0, 5.0, 5.0], 3) == [0, 2, 3]  # equal scores: the earlier is kept
    assert keep_highest([2.0, 2.0, 2.0, 2.0], 2) == [0, 1]
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[4], lora=None)
    si = get_compressor("self_information")
    si.scores = lambda model, ids: [float("inf")] + [3.0] * (len(ids) - 1)  # all tied
    p = list(range(40, 60))
    assert si.compress(m, [p], 4) == [p[:5]]


def test_mean_pool_is_the_merge_encoder_at_init():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[1, 2, 4, 8], lora=LoraSettings(r=4))  # encoders untouched: at init
    for keep_tail in (0, 3):
        m.keep_tail = keep_tail
        ids = m.tokenize_prompts(PROMPTS)
        for k in (1, 2, 4, 8):
            merged = _use(m, "merge").build_batch(ids, k)
            pooled = _use(m, "mean_pool").build_batch(ids, k)
            assert torch.equal(merged.inputs_embeds, pooled.inputs_embeds)
            assert torch.equal(merged.attention_mask, pooled.attention_mask) and torch.equal(merged.position_ids, pooled.position_ids)
    with torch.no_grad():  # a trained (moved) encoder is no longer the mean: the test can see a difference
        torch.nn.init.normal_(m.encoders["4"].mlp[-1].weight, std=0.05)
    assert not torch.equal(_use(m, "merge").build_batch(ids, 4).inputs_embeds, _use(m, "mean_pool").build_batch(ids, 4).inputs_embeds)


def test_merge_compressor_is_build_batch_and_none_is_k1(tiny):
    ids = tiny.tokenize_prompts(PROMPTS)
    for k in (2, 4, 8):
        batch = tiny.build_batch(ids, k)
        for i, e in enumerate(get_compressor("merge").compress(tiny, ids, k)):
            torch.testing.assert_close(batch.inputs_embeds[i, batch.inputs_embeds.shape[1] - len(e) :], e, rtol=0, atol=0)
    k1 = tiny.build_batch(ids, 1).inputs_embeds
    assert torch.equal(_use(tiny, "none").build_batch(ids, 4).inputs_embeds, k1)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", LOCAL)
def test_batch_equals_single_for_every_compressor(tiny, name, k):
    _perturb_lora(tiny)
    _use(tiny, name)
    ids = tiny.tokenize_prompts(PROMPTS)
    targets = tiny.tokenize_targets(["yes", "no", "a", "bb", "yes", "no"])
    batch = tiny.build_batch(ids, k, targets)
    together = tiny.forward(batch, logits_to_keep=1).logits[:, -1]
    nll, counts, _ = tiny.target_nll(batch)
    for i, (p, t) in enumerate(zip(ids, targets)):
        alone = tiny.build_batch([p], k, [t])
        torch.testing.assert_close(together[i : i + 1], tiny.forward(alone, logits_to_keep=1).logits[:, -1], atol=1e-4, rtol=1e-4)
        a_nll, a_counts, _ = tiny.target_nll(alone)
        torch.testing.assert_close(nll[i : i + 1], a_nll, atol=1e-4, rtol=1e-4)
        assert counts[i] == a_counts[0]
    assert not torch.isnan(together).any()


def test_compressor_is_saved_and_old_exports_load_as_merge(tiny, tmp_path):
    _use(tiny, "random_drop")
    tiny.save(tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "ktm.json").read_text())
    assert meta["compressor"] == "random_drop"
    assert KTMModel.from_pretrained(tmp_path / "export").compressor.name == "random_drop"
    del meta["compressor"]  # an export from before the key
    write_json(tmp_path / "export" / "ktm.json", meta)
    assert KTMModel.from_pretrained(tmp_path / "export").compressor.name == "merge"


# -- llmlingua2 ------------------------------------------------------------------------------------

def test_llmlingua2_without_the_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llmlingua", None)  # importing it raises ImportError, installed or not
    with pytest.raises(KTMError) as err:
        KTMModel.from_base("config:tiny-llama", ks=[4], lora=None, compressor="llmlingua2")
    msg = str(err.value)
    assert "\n" not in msg and "needs the llmlingua package" in msg and "pip install llmlingua" in msg


def _fake_llmlingua(monkeypatch, prompt_compressor) -> None:
    module = types.ModuleType("llmlingua")
    module.PromptCompressor = prompt_compressor
    monkeypatch.setitem(sys.modules, "llmlingua", module)


def test_llmlingua2_offline_hub_is_one_line(monkeypatch):
    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them\n"
                      "in the cached files.\nCheck your internet connection or see the docs.")

    _fake_llmlingua(monkeypatch, offline)
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[4], lora=None, compressor="llmlingua2")  # the package is there
    with pytest.raises(KTMError) as err:
        m.build_batch(m.tokenize_prompts(PROMPTS), 4)
    msg = str(err.value)
    assert "\n" not in msg and "cannot load its hub model microsoft/llmlingua-2" in msg and "couldn't connect" in msg
    assert "Hugging Face hub" in msg


class _UppercaseClassifier(nn.Module):
    """Stands in for LLMLingua-2's token classifier: 'keep' for capital letters, 'drop' for the rest."""

    def __init__(self, tokenizer):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.keep = torch.tensor([t is not None and len(t) == 1 and t.isascii() and t.isupper() for t in tokens])

    def forward(self, input_ids):
        keep = self.keep[input_ids].float() * 10 - 5
        return types.SimpleNamespace(logits=torch.stack([torch.zeros_like(keep), keep], -1))


def test_llmlingua2_keeps_the_tokens_its_classifier_rates_highest(monkeypatch):
    class Stub:
        def __init__(self, model_name, device_map, use_llmlingua2):
            assert use_llmlingua2 and device_map == "cpu"
            self.tokenizer = byte_tokenizer()
            self.model = _UppercaseClassifier(self.tokenizer)
            self.max_seq_len = 8  # forces several windows

    _fake_llmlingua(monkeypatch, Stub)
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[2, 4], lora=None, compressor="llmlingua2")
    ids = m.tokenize_prompts(["abCDefGHijKLmnOP", "xY", "QrStUvWxYz"])
    out = m.compressor.compress(m, ids, 2)
    assert [m.tokenizer.decode(o) for o in out] == ["CDGHKLOP", "Y", "QSUWY"]
    assert [m.compressor.compress(m, [p], 2)[0] for p in ids] == out  # alone == in a batch
    assert [len(o) for o in m.compressor.compress(m, ids, 4)] == [merged_length(len(p), 4) for p in ids]
