"""Property tests (hypothesis).

1. The merge/pad/mask path, over any batch of prompt lengths (shorter than K, exactly K, K+1, mixes),
   any K in 1..8 and any keep_tail: layout arithmetic, no NaN, each example's merged sequence is built
   from its own tokens only, and a batch gives each example the result it gets alone.
2. The config loader, over invalid values and unknown keys: always exit 2 with one `ktm: error:` line.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktm.cli import main
from ktm.model import KTMModel, LoraSettings, block_layout, merged_length

KS = (1, 2, 3, 4, 5, 6, 7, 8)


@lru_cache(maxsize=1)
def tiny() -> KTMModel:
    """Tiny Llama with an encoder for every K in 1..8; non-zero encoder and LoRA outputs so a mix-up shows."""
    torch.manual_seed(0)
    model = KTMModel.from_base("config:tiny-llama", ks=list(KS), lora=LoraSettings(r=4))
    with torch.no_grad():
        for enc in model.encoders.values():
            if enc.mlp is not None:
                torch.nn.init.normal_(enc.mlp[-1].weight, std=0.05)
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.eval()


@st.composite
def batches(draw):
    k = draw(st.sampled_from(KS))
    keep_tail = draw(st.integers(0, 10))
    # lengths around the block edges (1, K-1, K, K+1, 2K+1) and anything up to 40
    near_k = st.sampled_from(sorted({1, max(1, k - 1), k, k + 1, 2 * k + 1, keep_tail + k}))
    lengths = draw(st.lists(st.one_of(near_k, st.integers(1, 40)), min_size=1, max_size=5))
    prompts = [draw(st.lists(st.integers(0, 255), min_size=n, max_size=n)) for n in lengths]
    targets = [draw(st.lists(st.integers(0, 255), min_size=1, max_size=4)) for _ in lengths]
    return k, keep_tail, prompts, targets


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches())
def test_merge_pad_mask_properties(case):
    k, keep_tail, prompts, targets = case
    model = tiny()
    model.keep_tail = keep_tail  # the layout reads it per call
    with torch.no_grad():
        batch = model.build_batch(prompts, k, targets)
        B, L, d = batch.inputs_embeds.shape
        assert (B, d) == (len(prompts), model.hidden_size)
        emb_table = model.embed.weight
        for i, p in enumerate(prompts):
            n = len(p)
            head, blocks, tail = block_layout(n, k, keep_tail)
            assert head + blocks * k + tail == n and head < k and tail == min(keep_tail, n)
            m = head + blocks + tail
            assert batch.merged_tokens[i] == m == merged_length(n, k, keep_tail)
            assert batch.prompt_tokens[i] == n
            real = m + len(targets[i])
            mask = batch.attention_mask[i]
            # left padding: zeros then ones, as many ones as real positions; positions count real ones only
            assert mask.tolist() == [0] * (L - real) + [1] * real
            assert batch.position_ids[i, L - real :].tolist() == list(range(real))
            assert not batch.inputs_embeds[i, : L - real].any()  # pads carry nothing
            # the merged prompt is made from this prompt's own tokens only (no pad, no neighbour)
            e = emb_table[torch.tensor(p)]
            body = e[head : head + blocks * k].reshape(blocks, k, d)
            expected = torch.cat([e[:head], model._encoder(k)(body) if blocks else e[:0], e[n - tail :]])
            torch.testing.assert_close(batch.inputs_embeds[i, L - real : L - real + m], expected, atol=1e-5, rtol=1e-5)
            assert batch.targets[i, batch.targets.shape[1] - len(targets[i]) :].tolist() == targets[i]
        assert not torch.isnan(batch.inputs_embeds).any()

        logits = model.forward(batch, logits_to_keep=0, use_cache=False).logits
        nll, counts, _ = model.target_nll(batch)
        assert not torch.isnan(logits).any() and torch.isfinite(nll).all()
        for i, (p, t) in enumerate(zip(prompts, targets)):
            alone = model.build_batch([p], k, [t])
            alone_logits = model.forward(alone, logits_to_keep=0, use_cache=False).logits[0]
            real = batch.attention_mask[i].bool()
            torch.testing.assert_close(logits[i, real], alone_logits, atol=1e-4, rtol=1e-4)
            alone_nll, alone_counts, _ = model.target_nll(alone)
            assert counts[i] == alone_counts[0] == len(t)
            torch.testing.assert_close(nll[i : i + 1], alone_nll, atol=1e-4, rtol=1e-4)


# -- the config loader -------------------------------------------------------------------------------

WORD = st.from_regex(r"[a-z][a-z_]{1,10}", fullmatch=True).filter(
    lambda w: w not in {"null", "true", "false", "yes", "no", "on", "off", "none", "nan", "inf", "y", "n"})
NOT_A_NUMBER = WORD
BAD = {
    # K values: none, zero, negative, fractional, not numbers, not a list
    "model.ks": st.one_of(st.just("[]"), st.integers(-50, 0).map(lambda k: f"[{k}]"), st.integers(-5, 0).map(lambda k: f"[1,{k}]"),
                          st.floats(0.1, 9.9).filter(lambda x: x != int(x)).map(lambda x: f"[{x:.2f}]"),
                          WORD.map(lambda w: f"[{w}]"), WORD, st.just("[true]")),
    "model.keep_tail": st.one_of(st.integers(-10_000, -1).map(str), st.floats(0.1, 50).filter(lambda x: x != int(x)).map(lambda x: f"{x:.2f}"), NOT_A_NUMBER),
    "data.batch_size": st.one_of(st.integers(-1000, 0).map(str), st.floats(0.1, 64).filter(lambda x: x != int(x)).map(lambda x: f"{x:.2f}"),
                                 NOT_A_NUMBER, st.just("null"), st.just("[8]")),
    "data.eval_batch_size": st.one_of(st.integers(-1000, 0).map(str), NOT_A_NUMBER),
    "model.lr_lora": st.one_of(st.floats(-10, -1e-9).map(lambda x: f"{x:.3g}"), st.sampled_from(["nan", "inf", "-inf", "[1e-4]"]), NOT_A_NUMBER),
    "model.lr_encoder": st.one_of(st.floats(-10, -1e-9).map(lambda x: f"{x:.3g}"), st.sampled_from(["nan", "-inf"]), NOT_A_NUMBER),
    "model.encoder_multiplier": st.one_of(st.floats(-10, 0).map(lambda x: f"{x:.3g}"), st.floats(0.001, 0.24).map(lambda x: f"{x:.3f}"), NOT_A_NUMBER),
    "model.lora.r": st.one_of(st.integers(-64, -1).map(str), NOT_A_NUMBER),
    "model.lora.dropout": st.one_of(st.floats(1.0, 10).map(lambda x: f"{x:.3f}"), st.floats(-10, -0.01).map(lambda x: f"{x:.3f}")),
    "model.max_prompt_tokens": st.one_of(st.integers(-100, 0).map(str), NOT_A_NUMBER),
    "model.long_prompt_policy": WORD.filter(lambda w: w not in {"error", "truncate_left"}),
    "data.max_train_examples": st.one_of(st.integers(-100, 0).map(str), NOT_A_NUMBER),
    "data.k_schedule": st.one_of(st.integers(-9, 0).map(lambda k: f"[{k}]"), WORD.map(lambda w: f"[{w}]")),
    "data.advance_threshold": st.one_of(st.floats(1.01, 100).map(lambda x: f"{x:.2f}"), st.floats(-100, -0.01).map(lambda x: f"{x:.2f}"), NOT_A_NUMBER),
    "trainer.max_epochs": NOT_A_NUMBER,
}


@st.composite
def bad_arguments(draw):
    if draw(st.integers(0, 4)) == 0:  # an unknown key, in a known section or at the top
        section = draw(st.sampled_from(["model.", "data.", "trainer.", "model.lora.", ""]))
        return f"--{section}{draw(WORD)}x={draw(st.integers(0, 9))}"
    key = draw(st.sampled_from(sorted(BAD)))
    return f"--{key}={draw(BAD[key])}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arg=bad_arguments())
def test_bad_config_values_always_give_one_clear_line(arg, capsys, tmp_path):
    capsys.readouterr()
    code = main(["fit", "--exp", "tree_k4", "--model.base=config:tiny-llama", "--model.ks=[1,4]", "--data.k_schedule=[1,4]",
                 "--root", str(tmp_path / "runs"), "--trainer.max_epochs=1", "--data.max_train_examples=8", arg])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("INFO: Seed set to")]
    assert code == 2, (arg, err)
    assert len(lines) == 1 and lines[0].startswith("ktm: error: ") and " -> " in lines[0], (arg, err)
    assert "Traceback" not in err
