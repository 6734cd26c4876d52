"""The method: merge encoder, block layout, padding/masking invariance, generation, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from ktm.encoder import MergeEncoder, encoder_parameters, hidden_size
from ktm.errors import KTMError
from ktm.io import write_json
from ktm.model import UNRECORDED, KTMModel, LoraSettings, block_layout, last_positions, merged_length

PROMPTS = ["Tree: ab\n+cd, Task: Parent/Child Relationship, Parent: ab, Child: cd, Answer: ",
           "hi", "abc", "abcd", "abcde", "a much longer prompt than the others, with several words in it"]


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_encoder_is_the_mean_at_init(k):
    torch.manual_seed(0)
    enc = MergeEncoder(k, 16)
    blocks = torch.randn(5, k, 16)
    torch.testing.assert_close(enc(blocks), blocks.mean(1))
    torch.testing.assert_close(enc(blocks.flatten(-2)), blocks.mean(1))  # (.., K*d) input too


def test_correction_ratio_is_zero_at_init_and_measures_the_learned_part(tiny):
    ids = tiny.tokenize_prompts(PROMPTS)
    last = tiny.encoders["2"].mlp[-1]
    with torch.no_grad():
        last.weight.zero_()  # the fixture perturbs it; back to the init state
    assert tiny.correction_ratio(ids, 2) == 0.0 and tiny.correction_ratio(ids, 1) == 0.0
    tiny.encoders["2"].bound = None  # the paper's unbounded encoder: the correction is the MLP's output
    with torch.no_grad():
        last.bias.fill_(1.0)  # the correction is now the constant vector of ones: norm sqrt(d)
    _, _, blocks = tiny._blocks(ids, 2)
    expected = tiny.hidden_size ** 0.5 / float(blocks.mean(1).norm(dim=-1).mean())
    assert tiny.correction_ratio(ids, 2) == pytest.approx(expected, rel=1e-5)
    mean, correction = tiny.encoders["2"].parts(blocks)
    torch.testing.assert_close(tiny.encoders["2"](blocks), mean + correction)


def test_bounded_encoder_is_exactly_the_mean_at_init_and_the_paper_near_it():
    torch.manual_seed(0)
    blocks = torch.randn(5, 4, 8)
    bounded, free = MergeEncoder(4, 8), MergeEncoder(4, 8, bound=None)
    assert torch.equal(bounded(blocks), blocks.mean(1))  # the bound scales a zero correction: still zero
    with torch.no_grad():
        torch.nn.init.normal_(bounded.mlp[-1].weight, std=1e-6)
    free.load_state_dict(bounded.state_dict())
    # |c| << |m|: the bounded correction is the free one to first order (c * (1 - |c|/|m|) for b = 1)
    _, c_bounded = bounded.parts(blocks)
    _, c_free = free.parts(blocks)
    torch.testing.assert_close(c_bounded, c_free, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("bound", [0.5, 1.0, 2.0])
def test_bound_holds_for_an_adversarially_large_correction(bound):
    torch.manual_seed(0)
    enc = MergeEncoder(4, 8, bound=bound)
    with torch.no_grad():
        enc.mlp[-1].bias.fill_(1e6)
        enc.mlp[-1].weight.normal_(std=1e3)
    blocks = torch.randn(50, 4, 8)
    mean, correction = enc.parts(blocks)
    ratio = correction.norm(dim=-1) / mean.norm(dim=-1)
    assert float(ratio.max()) <= bound * (1 + 1e-6) and float(ratio.min()) > 0.99 * bound  # saturated, not past it
    torch.testing.assert_close(enc(blocks), mean + correction)


def _train_encoder_at_lr(model, ids, k, lr, steps=5):
    enc = model.encoders[str(k)]
    opt = torch.optim.SGD(enc.parameters(), lr=lr)
    targets = [[7, 8, 9]] * len(ids)
    for _ in range(steps):
        batch = model.build_batch(ids, k, targets)
        nll, counts, _ = model.target_nll(batch)
        opt.zero_grad()
        (-nll.sum() / counts.sum()).backward()  # ascend the loss: push the encoder as far as it will go
        opt.step()


def test_bounded_encoder_cannot_swamp_the_mean_at_lr_1_but_the_paper_encoder_does():
    ratios = {}
    for bound in (1.0, None):
        torch.manual_seed(0)
        model = KTMModel.from_base("config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=0), encoder_bound=bound)
        ids = model.tokenize_prompts(PROMPTS)
        _train_encoder_at_lr(model, ids, 4, lr=1.0)
        ratios[bound] = model.correction_ratio(ids, 4)
    assert ratios[1.0] <= 1.0
    assert ratios[None] > 2.0  # without the bound the same steps leave the mean far behind


def test_encoder_k1_is_identity_and_paper_sizes():
    enc = MergeEncoder(1, 8)
    x = torch.randn(3, 1, 8)
    assert torch.equal(enc(x), x[:, 0]) and not list(enc.parameters())
    assert hidden_size(2, 10) == 40 and hidden_size(3, 10) == 60 and hidden_size(4, 10) == 60
    assert hidden_size(8, 10) == 80  # our rule for K >= 5: f = 1.0


@pytest.mark.parametrize("shape", ["paper", "shallow"])
@pytest.mark.parametrize("k, d, multiplier", [(1, 8, None), (2, 8, None), (4, 6, None), (8, 4, None), (4, 6, 0.5)])
def test_the_encoder_parameter_count_is_the_built_encoders(k, d, multiplier, shape):
    assert encoder_parameters(k, d, multiplier, shape) == sum(p.numel() for p in MergeEncoder(k, d, multiplier, shape=shape).parameters())


def test_the_shallow_encoder_drops_the_middle_layer_and_starts_at_the_mean():
    # model.encoder_shape: shallow = Linear(K*d, h) -> ReLU -> Linear(h, d); at K=4, d=576 it has 10.0 M weights
    # against the paper's 17.3 M
    torch.manual_seed(0)
    enc = MergeEncoder(4, 6, shape="shallow")
    assert [tuple(m.weight.shape) for m in enc.mlp if isinstance(m, torch.nn.Linear)] == [(36, 24), (6, 36)]
    blocks = torch.randn(5, 4, 6)
    torch.testing.assert_close(enc(blocks), blocks.mean(dim=-2), atol=0, rtol=0)
    assert encoder_parameters(4, 576, shape="shallow") == 9_957_312 and encoder_parameters(4, 576) == 17_258_688


@pytest.mark.parametrize("shape", ["paper", "shallow"])
def test_a_seed_draws_the_encoder_layers_in_order(shape):
    """The layers draw their initial weights first to last, so a seed gives the encoder it gave before
    model.encoder_shape existed (the shapes once built the last layers first: every fresh encoder, and every run
    made with one, changed; read_k1248 no longer reproduced its recorded perplexities)."""
    torch.manual_seed(0)
    enc = MergeEncoder(2, 3, shape=shape)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3 if shape == "shallow" else 6)
    linears = [m for m in enc.mlp if isinstance(m, torch.nn.Linear)]
    torch.testing.assert_close(linears[0].weight, first.weight, atol=0, rtol=0)
    torch.testing.assert_close(linears[0].bias, first.bias, atol=0, rtol=0)
    if shape == "paper":  # the middle layer draws next; the last starts at zero
        torch.testing.assert_close(linears[1].weight, second.weight, atol=0, rtol=0)


@pytest.mark.parametrize("n,k,tail,expected", [(10, 4, 0, (2, 2, 0)), (3, 4, 0, (3, 0, 0)), (8, 4, 0, (0, 2, 0)),
                                               (10, 4, 3, (3, 1, 3)), (2, 4, 5, (0, 0, 2)), (7, 1, 0, (0, 7, 0))])
def test_block_layout(n, k, tail, expected):
    head, blocks, t = block_layout(n, k, tail)
    assert (head, blocks, t) == expected and head + blocks * k + t == n and head < k
    assert merged_length(n, k, tail) == head + blocks + t


@pytest.mark.parametrize("n,length,expected", [(0, 5, 0), (1, 5, [4]), (3, 5, [2, 3, 4]), (7, 5, [0, 1, 2, 3, 4])])
def test_last_positions(n, length, expected):
    got = last_positions(n, length)
    assert (got == expected) if isinstance(got, int) else got.tolist() == expected


def test_the_lm_head_reads_the_kept_positions_without_copying_its_weight():
    """logits_to_keep as indices (last_positions) gives the int form's logits, and no step of the forward copies the
    head weight. With the int form's strided slice, torch.matmul on bfloat16 expands and
    copies the transposed weight once per row on every call (0.65 s of a 1.2 s prefill for Qwen2.5's vocabulary
    on 2 CPU cores, README Speed)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = KTMModel.from_base("config:tiny-llama", ks=[1, 2], lora=LoraSettings(r=4), dtype="bfloat16").eval()
    batch = model.build_batch(model.tokenize_prompts(PROMPTS), 2)
    head = model.lm.get_output_embeddings().weight
    kwargs = dict(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    with torch.no_grad():
        want = model.lm(**kwargs, logits_to_keep=3).logits
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            got = model.forward(batch, logits_to_keep=3).logits
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof_int:
            model.lm(**kwargs, logits_to_keep=3)
    torch.testing.assert_close(got, want, atol=0, rtol=0)

    def copies_of_the_head(p):
        transposed = [head.shape[1], head.shape[0]]  # (hidden, vocab): the weight as the matmul reads it
        return [e for e in p.events() if e.name == "aten::copy_" and any(list(shape[-2:]) == transposed for shape in e.input_shapes)]

    from ktm.environment import cpu_has_native_bf16

    if cpu_has_native_bf16():  # seen where the CPU computes bf16 natively; an AVX2-only EPYC made no copy (2026-12-08)
        assert copies_of_the_head(prof_int), "the int form no longer copies the head: last_positions may be unneeded"
    assert not copies_of_the_head(prof)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_batch_equals_single(tiny, k):
    ids = tiny.tokenize_prompts(PROMPTS)
    batch = tiny.build_batch(ids, k)
    together = tiny.forward(batch, logits_to_keep=1).logits[:, -1]
    for i, p in enumerate(ids):
        alone = tiny.forward(tiny.build_batch([p], k), logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    assert not torch.isnan(together).any()


@pytest.mark.parametrize("name, device, kernel", [("auto", "cpu", "blocked_causal"), ("auto", "cuda", "sdpa"), ("auto", "mps", "sdpa"),
                                                  ("sdpa", "cpu", "sdpa"), ("eager_float32", "cuda", "eager_float32")])
def test_auto_attention_is_each_devices_measured_kernel(name, device, kernel):
    from ktm.attention import resolve

    assert resolve(name, device) == kernel


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kernel", ["eager", "eager_float32", "blocked_causal"])
def test_eager_kernels_give_the_sdpa_logits_and_gradients(tiny, k, kernel):
    # model.attention: eager, eager_float32 or blocked_causal (ktm/attention.py): the same model up to float
    # rounding, padded batches included
    ids = tiny.tokenize_prompts(PROMPTS)
    assert tiny.attention == "sdpa"
    outputs = {}
    for name in ("sdpa", kernel):
        batch = tiny.build_batch(ids, k)
        tiny.use_attention(name)
        assert tiny.attention == name
        tiny.zero_grad()
        logits = tiny.forward(batch).logits
        logits[batch.attention_mask.bool()].square().mean().backward()
        lora_grads = [p.grad.clone() for p in tiny.trainable_parameters()["lora"]]
        outputs[name] = (logits[batch.attention_mask.bool()].detach(), lora_grads)
    torch.testing.assert_close(outputs[kernel][0], outputs["sdpa"][0], atol=1e-4, rtol=1e-4)
    for mine, sdpa in zip(outputs[kernel][1], outputs["sdpa"][1]):
        torch.testing.assert_close(mine, sdpa, atol=1e-4, rtol=1e-3)
    assert any(g.abs().sum() > 0 for g in outputs["sdpa"][1])


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("kernel", ["eager_float32", "blocked_causal"])
def test_custom_attention_gets_the_padding_mask(tiny, k, kernel):
    # transformers gives a custom kernel no mask unless one is registered for it: an example's logits must not
    # depend on the padded batch it is in
    tiny.use_attention(kernel)
    ids = tiny.tokenize_prompts(PROMPTS)
    together = tiny.forward(tiny.build_batch(ids, k), logits_to_keep=1).logits[:, -1]
    for i, p in enumerate(ids):
        alone = tiny.forward(tiny.build_batch([p], k), logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=1e-4)


def test_eager_float32_attention_ignores_autocast_and_groups_query_heads():
    # The point of the kernel: under bf16 autocast its scores, softmax and weighted sum stay float32 (eager's
    # scores are a bfloat16 matmul there). Grouped-query heads (4 query heads on 2 key/value heads) and an
    # additive mask, against float64 SDPA.
    from ktm.attention import eager_float32_attention

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    v = torch.randn(2, 2, 5, 8, dtype=torch.bfloat16)
    mask = torch.zeros(2, 1, 5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), torch.finfo(torch.float32).min)
    module = torch.nn.Module().eval()
    plain, weights = eager_float32_attention(module, q, k, v, mask, scaling=8 ** -0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast, _ = eager_float32_attention(module, q, k, v, mask, scaling=8 ** -0.5)
    assert plain.shape == (2, 5, 4, 8) and plain.dtype == torch.bfloat16 and weights.dtype == torch.float32
    assert torch.equal(plain, autocast)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1), is_causal=True)
    torch.testing.assert_close(plain.double(), expected.transpose(1, 2), atol=1e-2, rtol=0)  # the bfloat16 output rounding


@pytest.mark.parametrize("queries, keys, block", [(7, 7, 3), (7, 7, 256), (4, 11, 3), (1, 9, 256)])
def test_blocked_causal_attention_is_causal_attention_over_blocks(queries, keys, block):
    # blocked_causal (ktm/attention.py) against float64 SDPA: grouped queries (4 heads on 2), blocks that do not
    # divide the queries, the queries as the last of the keys (a decode step, a prefill after a cache), SDPA's
    # boolean mask with one sequence left-padded, and bfloat16 inputs within their rounding
    from ktm.attention import blocked_causal_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, queries, 8), torch.randn(2, 2, keys, 8), torch.randn(2, 2, keys, 8)
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    padded = causal.expand(2, 1, queries, keys).clone()
    padded[1, :, :, :2] = False
    module = torch.nn.Module().eval()

    def expected(mask):
        grouped = (q.double(), k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1))
        return torch.nn.functional.scaled_dot_product_attention(*grouped, attn_mask=mask).transpose(1, 2)

    out, weights = blocked_causal_attention(module, q, k, v, None, scaling=8 ** -0.5, block=block)
    assert out.shape == (2, queries, 4, 8) and out.dtype == torch.float32 and weights is None
    torch.testing.assert_close(out.double(), expected(causal), atol=1e-5, rtol=0)
    out, _ = blocked_causal_attention(module, q, k, v, padded, scaling=8 ** -0.5, block=block)
    seen = padded[:, 0].any(-1)  # rows that see a key at all (SDPA and this kernel differ only on the others)
    torch.testing.assert_close(out.double()[seen], expected(padded)[seen], atol=1e-5, rtol=0)
    low, _ = blocked_causal_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, scaling=8 ** -0.5, block=block)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), expected(causal), atol=5e-2, rtol=0)


@pytest.mark.parametrize("k", [1, 4])
def test_frozen_linears_kept_in_bfloat16_train_bit_identically_under_autocast(k):
    # What autocast computes a float32 linear with is its bfloat16 cast; cast once (store_frozen_linears, done by
    # the trainer in bf16-mixed) the loss and every trainable gradient are bit-identical, and faster.
    def loss_and_grads(store: bool):
        torch.manual_seed(0)
        model = KTMModel.from_base("config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=4))
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # a LoRA that matters
        torch.nn.init.normal_(model.encoders["4"].mlp[-1].weight, std=0.02)
        if store:
            assert model.store_frozen_linears(torch.bfloat16) > 0 and model.store_frozen_linears(torch.bfloat16) == 0
            assert model.frozen_linear_dtype == torch.bfloat16
            assert model.embed.weight.dtype == torch.float32  # the tied table stays: the head got its own copy
            assert model.lm.get_output_embeddings().weight.dtype == torch.bfloat16
        ids = model.tokenize_prompts(PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            batch = model.build_batch(ids, k, [[5, 6, 7]] * len(ids))
            nll, counts, _ = model.target_nll(batch)
            loss = nll.sum() / counts.sum()
        loss.backward()
        params = model.trainable_parameters()
        return loss.detach(), [p.grad for p in params["lora"] + params["encoder"] if p.grad is not None]

    (loss, grads), (stored_loss, stored_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(loss, stored_loss) and len(grads) == len(stored_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, stored_grads))


def test_pads_are_masked_and_positions_count_real_tokens(tiny):
    ids = tiny.tokenize_prompts(["ab", "abcdefghij"])
    b = tiny.build_batch(ids, 4)
    # "ab" -> 2 head tokens, 0 blocks; "abcdefghij" -> 2 head + 2 blocks
    assert b.merged_tokens.tolist() == [2, 4] and b.prompt_tokens.tolist() == [2, 10]
    assert b.attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert b.position_ids[0, 2:].tolist() == [0, 1] and b.position_ids[1].tolist() == [0, 1, 2, 3]
    assert torch.count_nonzero(b.inputs_embeds[0, :2]) == 0  # pad positions carry nothing


@pytest.mark.parametrize("k, kept, expected", [
    (4, [0, 0], [[0, 0, 1, 2, 3], [0, 1, 5, 9, 10]]),  # "ab": head 2 + answer; "abcdefghij": head 2, blocks end at 5 and 9
    (2, [0, 0], [[0, 0, 0, 1, 2, 3], [1, 3, 5, 7, 9, 10]]),
    (4, [0, 3], [[0, 0, 0, 0, 0, 1, 2, 3], [0, 1, 2, 6, 7, 8, 9, 10]]),  # a kept span of 3: head 3, one block, 3 kept tokens
    (1, [0, 0], [[0] * 8 + [0, 1, 2, 3], list(range(11)) + [0]]),  # no merging: the compact positions (checked below)
])
def test_spread_positions_are_each_merged_blocks_last_token_in_the_uncompressed_prompt(tiny, k, kept, expected):
    ids = tiny.tokenize_prompts(["ab", "abcdefghij"])
    targets = [[5, 6], [7]]
    compact = tiny.build_batch(ids, k, targets, kept=kept)
    tiny.merged_positions = "spread"
    b = tiny.build_batch(ids, k, targets, kept=kept)
    if k == 1:
        assert torch.equal(b.position_ids, compact.position_ids)
        return
    assert b.position_ids.tolist() == expected  # left padding at 0, as in the compact layout
    assert torch.equal(b.inputs_embeds, compact.inputs_embeds) and torch.equal(b.attention_mask, compact.attention_mask)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_spread_positions_keep_a_batch_equal_to_its_examples_and_generation_to_single_prompts(tiny, k):
    tiny.merged_positions = "spread"
    ids = tiny.tokenize_prompts(PROMPTS)
    together = tiny.forward(tiny.build_batch(ids, k), logits_to_keep=1).logits[:, -1]
    for i, p in enumerate(ids):
        alone = tiny.forward(tiny.build_batch([p], k), logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    calls = []
    handle = tiny.lm.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw["position_ids"][:, -1].tolist()), with_kwargs=True)
    batched = tiny.generate_ids(ids[:3], k=k, max_new_tokens=3)
    handle.remove()
    assert calls[1] == [len(p) for p in ids[:3]]  # the first decoded token sits where it would after the uncompressed prompt
    assert [r[:3] for r in batched] == [tiny.generate_ids([p], k=k, max_new_tokens=3)[0] for p in ids[:3]]


def test_merged_positions_round_trip_through_an_export_and_a_bad_value_is_one_line(tiny, tmp_path):
    tiny.merged_positions = "spread"
    loaded = KTMModel.from_pretrained(tiny.save(tmp_path / "export"))
    assert loaded.merged_positions == "spread"
    ids = tiny.tokenize_prompts(PROMPTS)
    torch.testing.assert_close(tiny.forward(tiny.build_batch(ids, 4), logits_to_keep=1).logits,
                               loaded.forward(loaded.build_batch(ids, 4), logits_to_keep=1).logits)
    with pytest.raises(KTMError, match="model.merged_positions must be one of compact, spread, got 'stretch'"):
        KTMModel.from_base("config:tiny-llama", ks=[4], merged_positions="stretch")
    from ktm.training.module import KTMModule

    assert KTMModule(base="config:tiny-llama", ks=[1, 4], merged_positions="spread").model.merged_positions == "spread"


def test_blocks_never_contain_padding(tiny):
    """Every block that reaches the encoder holds only real token embeddings of its own prompt."""
    seen = []
    handle = tiny.encoders["4"].register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    ids = tiny.tokenize_prompts(["abcdefg", "xyz", "0123456789ab"])
    tiny.build_batch(ids, 4)
    handle.remove()
    blocks = seen[0]  # (sum of blocks, K, d)
    pad_vec = tiny.embed.weight[tiny.pad_id]
    assert blocks.shape[0] == 1 + 0 + 3
    assert not (blocks == pad_vec).all(-1).any()
    expected = torch.cat([tiny.embed(torch.tensor(ids[0][3:7]))[None], tiny.embed(torch.tensor(ids[2])).view(3, 4, -1)])
    torch.testing.assert_close(blocks, expected)


def test_keep_tail_leaves_last_tokens_unmerged():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[4], lora=None, keep_tail=3)
    ids = m.tokenize_prompts(["abcdefghijk"])  # 11 tokens: head 0, 2 blocks, tail 3
    b = m.build_batch(ids, 4)
    assert b.merged_tokens.tolist() == [5]
    torch.testing.assert_close(b.inputs_embeds[0, -3:], m.embed(torch.tensor(ids[0][-3:])))


def test_targets_are_right_aligned_and_loss_only_on_them(tiny):
    ids = tiny.tokenize_prompts(["abcd", "abcdefgh"])
    tgt = tiny.tokenize_targets(["true", "no"])
    b = tiny.build_batch(ids, 2, tgt)
    assert b.targets.shape == (2, 5)
    assert b.targets[1, :2].tolist() == [-100, -100] and b.targets[1, 2:].tolist() == tgt[1]
    nll, counts, _ = tiny.target_nll(b)
    assert counts.tolist() == [5, 3] and torch.isfinite(nll).all()


def test_k1_greedy_equals_base_generate_tiny():
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[1], lora=None).eval()
    ids = m.tokenize_prompts(["hello world"])[0]
    ref = m.lm.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=m.pad_id,
                        eos_token_id=None)[0, len(ids):].tolist()
    ours = m.generate_ids([ids], k=1, max_new_tokens=10)[0]
    assert ours == ref[: len(ours)] and len(ours) >= 1


def test_bf16_autocast_gives_the_float32_greedy_answers_on_the_tiny_model():
    # bf16-mixed (the default on CPUs with native bf16) evaluates and generates under bfloat16 autocast: the same
    # greedy answers as float32, at K=1 and merged, with logits within bfloat16 rounding (the top-2 margins of these
    # prompts are >= 0.017; the largest logit gap was 0.003)
    torch.manual_seed(0)
    m = KTMModel.from_base("config:tiny-llama", ks=[1, 4], lora=LoraSettings(r=4)).eval()
    ids = m.tokenize_prompts(PROMPTS)
    for k in (1, 4):
        batch = m.build_batch(ids, k)
        with torch.no_grad():
            full = m.forward(batch).logits[:, -1]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = m.forward(batch).logits[:, -1].float()
                answers = m.generate_ids(ids, k=k, max_new_tokens=8)
        torch.testing.assert_close(low, full, atol=0.01, rtol=0.0)
        assert answers == m.generate_ids(ids, k=k, max_new_tokens=8)


def test_generation_uses_kv_cache_and_batches(tiny):
    calls = []
    handle = tiny.lm.register_forward_pre_hook(lambda mod, args, kw: calls.append(kw.get("inputs_embeds") is not None), with_kwargs=True)
    out = tiny.generate_ids(tiny.tokenize_prompts(PROMPTS[:3]), k=4, max_new_tokens=6)
    handle.remove()
    assert calls[0] is True and not any(calls[1:])  # one prefill, then single tokens from the cache
    batched = [r[:6] for r in out]
    singles = [tiny.generate_ids(tiny.tokenize_prompts([p]), k=4, max_new_tokens=6)[0] for p in PROMPTS[:3]]
    assert batched == singles


def test_save_and_from_pretrained_round_trip(tiny, tmp_path):
    with torch.no_grad():  # make LoRA non-trivial so a lost adapter would show
        for n, p in tiny.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    tiny.save(tmp_path / "export")
    loaded = KTMModel.from_pretrained(tmp_path / "export")
    ids = tiny.tokenize_prompts(PROMPTS)
    for k in (1, 4, 8):
        a = tiny.forward(tiny.build_batch(ids, k), logits_to_keep=1).logits
        b = loaded.forward(loaded.build_batch(ids, k), logits_to_keep=1).logits
        torch.testing.assert_close(a, b)
    assert loaded.ks == [1, 2, 4, 8] and (tmp_path / "export" / "adapter" / "adapter_model.safetensors").exists()


def test_an_export_from_before_each_setting_loads_with_the_value_it_then_had(tiny, tmp_path):
    path = tiny.save(tmp_path / "export")
    meta = json.loads((path / "ktm.json").read_text())
    write_json(path / "ktm.json", {k: v for k, v in meta.items() if k not in UNRECORDED})  # with its sha256 sidecar
    old = KTMModel.from_pretrained(path)
    now = {k: v for k, v in old.metadata().items() if k in UNRECORDED}
    assert now == UNRECORDED and len(now) == len(UNRECORDED)  # every key of the table is one this ktm records


def test_merge_export_for_serving(tiny):
    out = tiny.merge(["abcdefghij", "ab"], k=4)
    assert out["merged_tokens"] == [4, 2] and [e.shape[0] for e in out["prompt_embeds"]] == [4, 2]
    assert out["prompt_embeds"][0].shape[1] == tiny.hidden_size


def test_bad_k_and_bad_prompts_are_clear(tiny):
    with pytest.raises(KTMError, match="K must be a whole number"):
        KTMModel(tiny.lm, tiny.tokenizer, ks=[0], lora=None)
    with pytest.raises(KTMError, match="keep_tail"):
        KTMModel(tiny.lm, tiny.tokenizer, ks=[2], keep_tail=-1, lora=None)
    with pytest.raises(KTMError, match="no encoder for K=3"):
        tiny.build_batch([[1, 2, 3]], 3)
    with pytest.raises(KTMError, match="prompt #1 is empty"):
        tiny.tokenize_prompts(["ok", ""])


def test_prompt_lengths_are_checked_up_front_with_count_and_longest(tiny):
    tiny.max_prompt_tokens = 20
    n_tokens = [len(r) for r in tiny.tokenizer(["a" * 5, "b" * 25, "c" * 40])["input_ids"]]  # byte tokenizer (+ specials)
    assert n_tokens[0] <= 20 < n_tokens[1] < n_tokens[2]
    with pytest.raises(KTMError, match=rf"2 of 3 train prompts are longer than the limit of 20 tokens \(longest {n_tokens[2]}\)"):
        tiny.check_prompt_lengths(["a" * 5, "b" * 25, "c" * 40], "train prompts")
    tiny.check_prompt_lengths(["a" * 5, "é" * 5], "val prompts")  # within the limit: silent
    tiny.long_prompt_policy = "truncate_left"
    tiny.check_prompt_lengths(["c" * 40])  # truncation is allowed (and counted when it happens)
