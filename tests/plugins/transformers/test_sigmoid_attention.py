"""The accel-transformers plugin: the "accel_sigmoid" attention backend, its masks, the softmax -> sigmoid
conversion, and discovery through the accel.plugins entry point.

Tiny random-weight Llama and Qwen2 models are built here (nothing is downloaded). The oracle is the same
model with an eager attention function (registered below) that runs accel.reference.sigmoid_attention.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from accel import _ext
from accel.patching import unmet_requirement

if unmet_requirement("transformers>=5"):
    pytest.skip(f"accel-transformers {unmet_requirement('transformers>=5')}", allow_module_level=True)
if not _ext.available():
    pytest.skip(f"accel._C not built: {_ext.load_error()}", allow_module_level=True)
accel_transformers = pytest.importorskip(
    "accel_transformers", reason="the plugin is not installed: pip install -e plugins/transformers --no-deps")

import accel  # noqa: E402
from accel.reference import sigmoid_attention as reference  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig, Qwen2Config, StaticCache)
from transformers import masking_utils as mu  # noqa: E402

NAME = "accel_sigmoid"
ORACLE = "accel_sigmoid_test_oracle"
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the eager oracle

def _oracle_mask(**kwargs):
    """transformers' boolean SDPA mask, always materialised, so the oracle can check what it is asked."""
    return mu.sdpa_mask(**{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                      **kwargs):
    """Eager sigmoid attention with accel.reference for unpadded causal (optionally sliding-window) masks,
    queries being the last keys. It refuses any other mask, so it can never be silently wrong."""
    B, _, lq, _ = query.shape
    lk = key.shape[2]
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    i = torch.arange(lq).unsqueeze(1) + (lk - lq)
    j = torch.arange(lk).unsqueeze(0)
    expected = (j <= i) & ((j >= i - window[0]) if window[0] >= 0 else True)
    assert attention_mask is not None and torch.equal(attention_mask[:, 0], expected.expand(B, lq, lk)), \
        "the oracle handles unpadded causal masks only"
    bias = getattr(module.config, "sigmoid_attn_bias", None)
    if isinstance(bias, (list, tuple)):
        bias = torch.tensor(bias, dtype=query.dtype)
    out = reference(query, key, value, bias=bias, scale=scaling, causal=True, window=window)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ORACLE, _oracle_attention)
mu.AttentionMaskInterface.register(ORACLE, _oracle_mask)


# ---------------------------------------------------------------- tiny models

def llama_config(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, **kw)


def qwen2_config(**kw):
    # layer 0 full attention, layer 1 a sliding window of 6 tokens
    return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, use_sliding_window=True,
                       sliding_window=6, max_window_layers=1, **kw)


CONFIGS = {"llama": llama_config, "qwen2": qwen2_config}


def build(family, attn_implementation=NAME, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family](**kw), attn_implementation=attn_implementation).eval()


def pair(family, **kw):
    fused = build(family, **kw)
    oracle = build(family, ORACLE, seed=1, **kw)
    oracle.load_state_dict(fused.state_dict())
    return fused, oracle


def tokens(batch=2, length=16, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def padding_mask(lengths, total, left):
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    return mask


# ---------------------------------------------------------------- registration and discovery

def test_registered_with_transformers_on_import():
    from accel_transformers.attention import sigmoid_attention_forward
    from accel_transformers.masks import sigmoid_attention_mask

    assert AttentionInterface._global_mapping[NAME] is sigmoid_attention_forward
    # without a mask function transformers would hand the attention no mask at all
    assert mu.AttentionMaskInterface._global_mapping[NAME] is sigmoid_attention_mask
    assert accel_transformers.registered()
    accel_transformers.register()  # idempotent
    assert build("llama").config._attn_implementation == NAME


def test_plugin_discovered_through_entry_point():
    try:
        dist = importlib.metadata.distribution("accel-transformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("accel-transformers is importable but not installed as a distribution")
    eps = [ep for ep in dist.entry_points if ep.group == "accel.plugins"]
    assert [(ep.name, ep.value) for ep in eps] == [("transformers", "accel_transformers:plugin")]
    status = {s.name: s for s in accel.patching.list_plugins(refresh=True)}["transformers"]
    assert status.loaded, status
    assert status.plugin is accel_transformers.plugin
    assert status.distribution == f"accel-transformers {dist.version}"
    assert status.plugin.requires == ("transformers>=5",)
    assert [r.name for r in status.plugin.method_patches] == ["transformers: softmax attention -> accel_sigmoid",
                                                             "transformers: causal conv1d -> streaming_conv1d"]


def test_plugin_skips_cleanly_without_transformers(tmp_path):
    """Without transformers the plugin still imports (accel reads its `plugin`) and reports the unmet requirement."""
    code = textwrap.dedent("""
        import importlib.metadata as md, sys
        real = md.version
        def version(name):
            if name == "transformers":
                raise md.PackageNotFoundError(name)
            return real(name)
        md.version = version
        sys.modules["transformers"] = None  # any import of it fails
        import accel
        from accel.patching import list_plugins
        print({s.name: s.status for s in list_plugins()}["transformers"])
    """)
    env = {**os.environ, "ACCEL_PLUGINS": "transformers"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "skipped: needs transformers>=5 (not installed)"


# ---------------------------------------------------------------- numerics against the oracle

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_eager_oracle(family):
    fused, oracle = pair(family)
    ids = tokens()
    with torch.no_grad():
        got, want = fused(ids).logits, oracle(ids).logits
    torch.testing.assert_close(got, want, **TOL)
    softmax = build(family, "sdpa")
    softmax.load_state_dict(fused.state_dict())
    assert not torch.allclose(softmax(ids).logits, got, atol=1e-3)  # it really is a different attention


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_step_matches_eager_oracle(family):
    fused, oracle = pair(family)
    ids = tokens(seed=1)
    losses, grads = [], []
    for model in (fused, oracle):
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert grads[0]["model.layers.1.self_attn.k_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("left", [False, True], ids=["right_padding", "left_padding"])
def test_padded_batch_equals_each_sequence_alone(family, left):
    """Padding goes through the varlen kernel: every sequence gets what it gets alone (bias -log of its own
    length), compared with both the fused backend and the eager oracle run on the unpadded sequence."""
    fused, oracle = pair(family)
    lengths, total = [16, 9, 3], 16
    mask = padding_mask(lengths, total, left)
    ids = tokens(batch=3, length=total, seed=2)
    with torch.no_grad():
        batch = fused(ids, attention_mask=mask).logits
        for b, n in enumerate(lengths):
            rows = slice(total - n, total) if left else slice(0, n)
            alone = ids[b:b + 1, rows]
            torch.testing.assert_close(batch[b, rows], fused(alone).logits[0], **TOL)
            torch.testing.assert_close(batch[b, rows], oracle(alone).logits[0], **TOL)


def test_padded_training_loss_and_grads_equal_unpadded():
    fused = build("llama").train()
    ids = tokens(batch=2, length=12, seed=3)
    mask = padding_mask([12, 7], 12, left=False)
    labels = ids.masked_fill(mask == 0, -100)
    fused(ids, attention_mask=mask, labels=labels).loss.backward()
    padded = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad()
    # the same tokens as two separate forwards, weighted like the batch's mean over its 11 + 6 predicted tokens
    (fused(ids[:1], labels=ids[:1]).loss * 11 / 17 + fused(ids[1:, :7], labels=ids[1:, :7]).loss * 6 / 17).backward()
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, padded[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_cached_decoding_equals_full_forward(cache_kind):
    """With a fixed bias (config.sigmoid_attn_bias), token-by-token decoding from a KV cache, left padding
    included, gives the full forward's logits: causal alignment, sliding windows and static-cache slots."""
    fused = build("qwen2", sigmoid_attn_bias=[-2.0, -1.0, -3.0, -2.5])
    ids = tokens(batch=2, length=12, seed=4)
    mask = padding_mask([12, 8], 12, left=True)
    with torch.no_grad():
        full = fused(ids, attention_mask=mask).logits
        cache = DynamicCache(config=fused.config) if cache_kind == "dynamic" else StaticCache(
            config=fused.config, max_cache_len=20)
        steps = [fused(ids[:, :7], attention_mask=mask[:, :7], cache=cache, use_cache=True).logits]
        for t in range(7, 12):
            steps.append(fused(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True).logits)
    decoded = torch.cat(steps, 1)
    torch.testing.assert_close(decoded[0], full[0], **TOL)
    torch.testing.assert_close(decoded[1, 4:], full[1, 4:], **TOL)


def test_static_cache_without_mask_and_generate():
    fused = build("llama", sigmoid_attn_bias=-2.0)
    ids = tokens(batch=2, length=10, seed=5)
    with torch.no_grad():
        full = fused(ids).logits
        cache = StaticCache(config=fused.config, max_cache_len=16)
        steps = [fused(ids[:, :4], cache=cache, use_cache=True).logits]
        steps += [fused(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    fused.generation_config.pad_token_id = 0
    out = fused.generate(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=3,
                         do_sample=False)
    assert out.shape == (2, 8)


def test_default_bias_and_config_override():
    fused = build("llama")
    ids = tokens(seed=6)
    default = fused(ids).logits
    fused.config.sigmoid_attn_bias = -2.0
    assert not torch.allclose(fused(ids).logits, default)
    fused.config.sigmoid_attn_bias = -float(torch.log(torch.tensor(16.0)))  # -log(L_k) written out
    torch.testing.assert_close(fused(ids).logits, default, **TOL)
    fused.config.sigmoid_attn_bias = [1.0, 2.0]
    with pytest.raises(ValueError, match="a list of 4 floats"):
        fused(ids)


def test_packed_sequences_through_position_ids():
    fused = build("qwen2")
    ids = tokens(batch=1, length=14, seed=7)
    position_ids = torch.cat([torch.arange(5), torch.arange(9)]).unsqueeze(0)
    with torch.no_grad():
        packed = fused(ids, position_ids=position_ids, use_cache=False).logits
        torch.testing.assert_close(packed[0, :5], fused(ids[:, :5]).logits[0], **TOL)
        torch.testing.assert_close(packed[0, 5:], fused(ids[:, 5:]).logits[0], **TOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_compile_fullgraph(family, use_cache):
    """Without a padding mask no mask is read on the host: one graph (with use_cache=False transformers passes
    its packed-sequence mask function, mapped with fixed shapes)."""
    fused = build(family)
    ids = tokens(seed=8)
    want = fused(ids, use_cache=use_cache).logits
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids, use_cache=use_cache).logits, want, **TOL)


def test_exact_4d_masks_are_accepted():
    fused = build("llama")
    ids = tokens(seed=9)
    want = fused(ids, use_cache=False).logits
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None].expand(2, 1, 16, 16)
    torch.testing.assert_close(fused(ids, attention_mask=causal, use_cache=False).logits, want, **TOL)
    additive = torch.zeros(2, 1, 16, 16).masked_fill(~causal, torch.finfo(torch.float32).min)
    torch.testing.assert_close(fused(ids, attention_mask=additive, use_cache=False).logits, want, **TOL)


def test_unsupported_inputs_raise_clear_errors():
    fused = build("llama")
    ids = tokens(seed=10)
    holes = torch.ones(16, 16, dtype=torch.bool).tril()[None, None].expand(2, 1, 16, 16).clone()
    holes[:, :, 9, 3] = False
    with pytest.raises(ValueError, match="no accel sigmoid attention call computes it exactly"):
        fused(ids, attention_mask=holes, use_cache=False)
    bias = torch.zeros(2, 1, 16, 16).masked_fill(~holes, -1e9) + 0.5
    with pytest.raises(ValueError, match="additive bias"):
        fused(ids, attention_mask=bias, use_cache=False)
    with pytest.raises(NotImplementedError, match="output_attentions=True"):
        fused(ids, output_attentions=True)
    fused.train()
    for layer in fused.model.layers:
        layer.self_attn.attention_dropout = 0.1
    with pytest.raises(NotImplementedError, match="attention dropout"):
        fused(ids)


def test_chunked_attention_maps_onto_segments_but_not_through_a_cache():
    from accel_transformers.masks import MaskNotSupported, sigmoid_attention_mask

    chunked = mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    # without a cache, chunks of 4 are packed segments: exact, one varlen sequence per chunk
    plan = sigmoid_attention_mask(batch_size=1, q_length=10, kv_length=10, mask_function=chunked, local_size=4)
    assert plan.varlen and plan.causal and plan.cu_seqlens_q.tolist() == [0, 4, 8, 10]
    # decoding token 9 sees keys 8..9 only: neither causal nor a window of 4 over one sequence
    with pytest.raises(MaskNotSupported, match="no accel sigmoid attention call computes it exactly"):
        sigmoid_attention_mask(batch_size=1, q_length=1, kv_length=10, q_offset=9, mask_function=chunked, local_size=4)


# ---------------------------------------------------------------- convert={"attention": "sigmoid"}

def test_softmax_model_unchanged_without_convert():
    model = build("llama", "sdpa")
    ids = tokens(seed=11)
    want = model(ids).logits
    report = accel.patch(model)
    assert len(report) == 0 and report.plugins["transformers"] == "loaded"
    assert {e.path: e.reason for e in report.skipped}[""] == \
        "changes the maths: opt in with convert={'attention': 'sigmoid'}"
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_convert_softmax_model_to_sigmoid_and_back(family):
    model = build(family, "sdpa")
    other = build(family, "sdpa")  # a second instance: must stay softmax
    ids = tokens(seed=12)
    softmax_logits = model(ids).logits
    report = accel.patch(model, convert={"attention": "sigmoid"})
    assert [(e.path, e.rule) for e in report.patched_methods] == [
        ("", "transformers: softmax attention -> accel_sigmoid")]
    assert {e.path: e.reason for e in report.skipped}["model"] == f"already uses attn_implementation={NAME!r}"
    assert model.config._attn_implementation == NAME and other.config._attn_implementation == "sdpa"
    sigmoid = build(family, seed=3)
    sigmoid.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids).logits, sigmoid(ids).logits, **TOL)
    torch.testing.assert_close(other(ids).logits, softmax_logits, rtol=0, atol=0)
    again = accel.patch(model, convert={"attention": "sigmoid"})
    assert len(again) == 0 and {e.path: e.reason for e in again.skipped}[""] == "already patched"
    assert accel.unpatch(model) == 1
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(ids).logits, softmax_logits, rtol=0, atol=0)


def test_convert_skips_with_reasons():
    dropout = build("llama", "sdpa", attention_dropout=0.1)
    reasons = {e.path: e.reason for e in accel.patch(dropout, convert={"attention": "sigmoid"}).skipped}
    assert reasons[""] == "config.attention_dropout=0.1 > 0: the fused sigmoid attention kernel has no dropout"
    assert dropout.config._attn_implementation == "sdpa"
    already = build("llama")
    reasons = {e.path: e.reason for e in accel.patch(already, convert={"attention": "sigmoid"}).skipped}
    assert reasons[""] == f"already uses attn_implementation={NAME!r}"
