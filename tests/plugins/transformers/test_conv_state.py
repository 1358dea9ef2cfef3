"""The accel-transformers plugin's causal conv rule: accel.patch routing hybrid models' ``causal_conv1d_update``
(decode) and ``causal_conv1d_fn`` (prefill) through accel.ops.streaming_conv1d / dilated_conv1d.

Tiny random-weight Mamba, Mamba2, LFM2 and Qwen3-Next causal LMs are built here (nothing is downloaded); the
oracle is the same model before patching (the replacement is per modeling module, so an unpatched copy of the
same family would run through accel too while the patched one exists).
"""
from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
from torch import nn

from accel import _ext
from accel.patching import unmet_requirement
from accel.patching.builtin import op_reason

if unmet_requirement("transformers>=5"):
    pytest.skip(f"accel-transformers {unmet_requirement('transformers>=5')}", allow_module_level=True)
if not _ext.available():
    pytest.skip(f"accel._C not built: {_ext.load_error()}", allow_module_level=True)
for _op in ("streaming_conv1d", "dilated_conv1d"):
    _missing = op_reason(_op, torch.device("cpu"), torch.float32)
    if _missing:
        pytest.skip(f"no {_op} CPU kernel: {_missing}", allow_module_level=True)
accel_transformers = pytest.importorskip(
    "accel_transformers", reason="the plugin is not installed: pip install -e plugins/transformers --no-deps")

import accel  # noqa: E402
import accel.ops  # noqa: E402
from accel_transformers import conv_state  # noqa: E402
from accel_transformers.conv_state import CAUSAL_CONV_RULE, FN, UPDATE, routed_modules  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, Lfm2Config, Mamba2Config, MambaConfig, Qwen3NextConfig)
from transformers.models.mamba import modeling_mamba  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_patch_state")

TOL = dict(rtol=1e-5, atol=1e-5)
FAMILIES = {  # family -> (config, the mixers' paths)
    "mamba": (lambda: MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=8, expand=2,
                                  conv_kernel=4),
              ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]),
    "mamba2": (lambda: Mamba2Config(hidden_size=32, num_hidden_layers=2, vocab_size=128, state_size=8, expand=2,
                                    conv_kernel=4, num_heads=4, head_dim=16, n_groups=1, chunk_size=8),
               ["backbone.layers.0.mixer", "backbone.layers.1.mixer"]),
    "lfm2": (lambda: Lfm2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=128, layer_types=["conv", "full_attention"],
                                conv_L_cache=3),
             ["model.layers.0.conv"]),
    "qwen3_next": (lambda: Qwen3NextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, vocab_size=128),
        ["model.layers.0.linear_attn"]),
}


def build(family, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family][0]()).to(dtype).eval()


def namespace(model):
    return sys.modules[type(model).__module__]


@pytest.fixture
def patch():
    """accel.patch that unpatches what it patched after the test, so no modeling module stays routed."""
    models = []

    def run(model, **kw):
        models.append(model)
        return accel.patch(model, **kw)

    yield run
    for model in reversed(models):
        accel.unpatch(model)
    assert routed_modules() == {}


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the two accel ops (the replacements look them up on accel.ops at call time)."""
    counts = {"streaming_conv1d": 0, "dilated_conv1d": 0}
    for name in counts:
        real = getattr(accel.ops, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            counts[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(accel.ops, name, spy)
    return counts


def generate(model, **kw):
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_logits=True, return_dict_in_generate=True, **kw)


# ---------------------------------------------------------------- generation

@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_unpatched(family, patch, calls):
    model = build(family)
    ns = namespace(model)
    originals = (getattr(ns, UPDATE), getattr(ns, FN))
    want = generate(model)
    assert calls == {"streaming_conv1d": 0, "dilated_conv1d": 0}

    report = patch(model)
    paths = FAMILIES[family][1]
    assert [(e.path, e.rule) for e in report.patched_methods] == [(p, CAUSAL_CONV_RULE.name) for p in paths]
    assert CAUSAL_CONV_RULE.name in str(report)
    assert routed_modules() == {ns.__name__: len(paths)}
    got = generate(model)
    # prefill once per conv layer, then 7 single-token decode steps through the cache
    assert calls == {"dilated_conv1d": len(paths), "streaming_conv1d": 7 * len(paths)}
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"step {step}: {m}")

    assert accel.unpatch(model) >= len(paths)
    assert (getattr(ns, UPDATE), getattr(ns, FN)) == originals
    assert getattr(ns, UPDATE) is originals[0] and getattr(ns, FN) is originals[1]
    assert routed_modules() == {}


def test_training_gradients_match_unpatched(patch, calls):
    model = build("mamba")
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for patched in (False, True):
        if patched:
            patch(model)
        model.train()
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert calls["dilated_conv1d"] == 2
    torch.testing.assert_close(grads[1][0], grads[0][0], **TOL)
    for name, g in grads[1][1].items():
        torch.testing.assert_close(g, grads[0][1][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert grads[1][1]["backbone.layers.0.mixer.conv1d.weight"].abs().sum() > 0


# ---------------------------------------------------------------- patch / unpatch bookkeeping

def test_refcount_across_models_and_repeated_patch(patch):
    ns = modeling_mamba
    originals = (ns.causal_conv1d_update, ns.causal_conv1d_fn)
    a, b = build("mamba"), build("mamba", seed=1)
    assert len(patch(a).patched_methods) == 2
    replaced = (ns.causal_conv1d_update, ns.causal_conv1d_fn)
    assert replaced[0] is not originals[0] and replaced[0].accel_original is originals[0]
    assert replaced[1].accel_original is originals[1]

    again = patch(a)  # idempotent: nothing new, no extra reference
    assert again.patched_methods == []
    assert {e.path: e.reason for e in again.skipped}["backbone.layers.0.mixer"] == "already patched"
    assert routed_modules() == {ns.__name__: 2}

    assert len(patch(b).patched_methods) == 2
    assert routed_modules() == {ns.__name__: 4}
    assert (ns.causal_conv1d_update, ns.causal_conv1d_fn) == replaced  # the second model shares the replacement

    accel.unpatch(a)  # b still holds it
    assert routed_modules() == {ns.__name__: 2}
    assert ns.causal_conv1d_update is replaced[0] and ns.causal_conv1d_fn is replaced[1]
    assert accel.unpatch(a) == 0
    assert routed_modules() == {ns.__name__: 2}

    accel.unpatch(b)
    assert ns.causal_conv1d_update is originals[0] and ns.causal_conv1d_fn is originals[1]
    assert routed_modules() == {}


def test_excluded_op_leaves_the_functions_alone(patch):
    model = build("mamba")
    before = (modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn)
    report = patch(model, exclude="streaming_conv1d")
    assert report.patched_methods == []
    assert {e.path: e.reason for e in report.skipped}["backbone.layers.0.mixer"] == "excluded (op 'streaming_conv1d')"
    assert (modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn) == before


def test_skipped_with_the_reason_when_no_kernel(patch, monkeypatch):
    model = build("mamba")
    for op in ("streaming_conv1d", "dilated_conv1d"):
        monkeypatch.setitem(conv_state._REASONS, (op, "cpu", None, torch.float32), "dtype float32 has no kernel here")
    report = patch(model)
    assert report.patched_methods == []
    assert {e.path: e.reason for e in report.skipped}["backbone.layers.1.mixer"] == "dtype float32 has no kernel here"
    assert routed_modules() == {}


FAKE_MODELING = textwrap.dedent("""
    def causal_conv1d_forward(conv1d, hidden_states, cache, layer_idx, activation=None, **kwargs):
        return causal_conv1d_fn(hidden_states, conv1d.weight.squeeze(1), conv1d.bias, activation=activation)

    class FakeMixer(nn.Module):
        def __init__(self, groups):
            super().__init__()
            self.conv1d = nn.Conv1d(8, 8, 4, groups=groups, padding=3)

        def forward(self, x):
            return causal_conv1d_forward(self.conv1d, x, None, 0, activation="silu")

    class OwnConv(nn.Module):  # a depthwise conv it runs itself
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(8, 8, 4, groups=8)

        def forward(self, x):
            return self.conv1d(x)
""")


def test_detection_is_by_modeling_module_not_by_class(patch, monkeypatch, calls):
    """Any layer whose class's Python module defines the three functions, which calls causal_conv1d_forward and
    has a depthwise Conv1d, is routed: here a made-up modeling module reusing transformers' Mamba functions."""
    fake = types.ModuleType("fake_modeling_hybrid")
    fake.nn = nn
    fake.causal_conv1d_update = modeling_mamba.causal_conv1d_update
    fake.causal_conv1d_fn = modeling_mamba.causal_conv1d_fn
    exec(FAKE_MODELING, fake.__dict__)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    plain = type("Plain", (nn.Module,), {"__module__": __name__})()  # a module without the functions
    plain.conv1d = nn.Conv1d(8, 8, 4, groups=8)
    torch.manual_seed(0)
    model = nn.Sequential(fake.FakeMixer(8), fake.FakeMixer(2), fake.OwnConv(), plain)
    assert [CAUSAL_CONV_RULE.matches(m) for m in model] == [True, False, False, False]
    x = torch.randn(2, 8, 5)
    want = model[0](x)

    report = patch(model, ops={"streaming_conv1d"})
    assert [(e.path, e.class_name) for e in report.patched_methods] == [("0", "FakeMixer")]
    assert fake.causal_conv1d_fn is not modeling_mamba.causal_conv1d_fn
    assert routed_modules() == {fake.__name__: 1}  # only the fake module: transformers' Mamba is untouched
    torch.testing.assert_close(model[0](x), want, **TOL)
    assert calls["dilated_conv1d"] == 1
    accel.unpatch(model)
    assert fake.causal_conv1d_fn is modeling_mamba.causal_conv1d_fn


def test_registered_with_the_plugin():
    assert CAUSAL_CONV_RULE in accel_transformers.plugin.method_patches
    assert CAUSAL_CONV_RULE.kind == "method" and CAUSAL_CONV_RULE.op == "streaming_conv1d"
    assert "streaming_conv1d" in CAUSAL_CONV_RULE.description and "dilated_conv1d" in CAUSAL_CONV_RULE.description


# ---------------------------------------------------------------- fallbacks and compile

def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(2, 12, 1, generator=g, dtype=dtype)
    xs = torch.randn(2, 12, 9, generator=g, dtype=dtype)
    state = torch.randn(2, 12, 4, generator=g, dtype=dtype)
    weight = torch.randn(12, 4, generator=g, dtype=dtype)
    bias = torch.randn(12, generator=g, dtype=dtype)
    return x1, xs, state, weight, bias


def test_routed_functions_match_originals(patch, calls):
    originals = (modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn)
    patch(build("mamba"))
    update, fn = modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn
    x1, xs, state, weight, bias = _inputs()
    for activation in (None, "silu", "swish", "relu", "gelu"):
        for b in (bias, None):
            s_got, s_want = state.clone(), state.clone()
            torch.testing.assert_close(update(x1, s_got, weight, b, activation=activation),
                                       originals[0](x1, s_want, weight, b, activation=activation), **TOL)
            torch.testing.assert_close(s_got, s_want, rtol=0, atol=0)
            torch.testing.assert_close(fn(xs, weight, b, activation=activation, position_ids=None),
                                       originals[1](xs, weight, b, activation=activation), **TOL)
    # a chunk of several tokens, and a state longer than K - 1 (transformers keeps K samples)
    long_state = torch.randn(2, 12, 6)
    s_got, s_want = long_state.clone(), long_state.clone()
    torch.testing.assert_close(update(xs, s_got, weight, bias, activation="silu"),
                               originals[0](xs, s_want, weight, bias, activation="silu"), **TOL)
    torch.testing.assert_close(s_got, s_want, rtol=0, atol=0)
    # bf16 activations through an fp32 conv: cast in, cast back, as the original does
    xb = x1.to(torch.bfloat16)
    s_got, s_want = state.clone(), state.clone()
    got = update(xb, s_got, weight, bias, activation="silu")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, originals[0](xb, s_want, weight, bias, activation="silu"))
    assert calls == {"streaming_conv1d": 12, "dilated_conv1d": 10}


def test_fallbacks_give_the_original_results(patch, calls):
    originals = (modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn)
    patch(build("mamba"))
    update, fn = modeling_mamba.causal_conv1d_update, modeling_mamba.causal_conv1d_fn
    x1, xs, state, weight, bias = _inputs()

    def same_update(x, s, w, b, activation):
        s_got, s_want = s.clone(), s.clone()
        torch.testing.assert_close(update(x, s_got, w, b, activation=activation),
                                   originals[0](x, s_want, w, b, activation=activation), rtol=0, atol=0)
        torch.testing.assert_close(s_got, s_want, rtol=0, atol=0)

    same_update(x1, state, weight, bias, "tanh")  # an activation accel does not fuse
    torch.testing.assert_close(fn(xs, weight, bias, activation="gelu_new"),
                               originals[1](xs, weight, bias, activation="gelu_new"), rtol=0, atol=0)
    same_update(x1, state.double(), weight, bias, "silu")  # conv state and weight in different dtypes
    same_update(x1, state.transpose(0, 1).contiguous().transpose(0, 1), weight, bias, "silu")  # non-contiguous state
    same_update(xs, state[..., :2].contiguous(), weight, bias, "silu")  # a state shorter than K - 1
    assert calls == {"streaming_conv1d": 0, "dilated_conv1d": 0}

    # packed sequences: only the causal-conv1d package keeps them apart; transformers' torch path refuses
    with pytest.raises(ValueError, match="packed sequences"):
        fn(xs, weight, bias, activation="silu", seq_idx=torch.zeros(2, 9, dtype=torch.int32))
    assert calls["dilated_conv1d"] == 0


def test_fallback_when_the_dtype_has_no_kernel(patch, calls, monkeypatch):
    patch(build("mamba"))
    for op in ("streaming_conv1d", "dilated_conv1d"):
        monkeypatch.setitem(conv_state._REASONS, (op, "cpu", None, torch.float64), "no float64 kernel")
    x1, xs, state, weight, bias = _inputs(dtype=torch.float64)
    s = state.clone()
    update_out = modeling_mamba.causal_conv1d_update(x1, s, weight, bias, activation="silu")
    fn_out = modeling_mamba.causal_conv1d_fn(xs, weight, bias, activation="silu")
    assert calls == {"streaming_conv1d": 0, "dilated_conv1d": 0}
    monkeypatch.undo()  # the real records: float64 runs in accel
    s2 = state.clone()
    torch.testing.assert_close(modeling_mamba.causal_conv1d_update(x1, s2, weight, bias, activation="silu"),
                               update_out)
    torch.testing.assert_close(s2, s)
    torch.testing.assert_close(modeling_mamba.causal_conv1d_fn(xs, weight, bias, activation="silu"), fn_out)


def test_compile_fullgraph(patch):
    x1, xs, state, weight, bias = _inputs()
    s_want = state.clone()
    want = (modeling_mamba.causal_conv1d_update(x1, s_want, weight, bias, activation="silu"),
            modeling_mamba.causal_conv1d_fn(xs, weight, bias, activation="silu"))
    patch(build("mamba"))

    def step(x1, xs, state, weight, bias):  # what causal_conv1d_forward does, through the module globals
        return (modeling_mamba.causal_conv1d_update(x1, state, weight, bias, activation="silu"),
                modeling_mamba.causal_conv1d_fn(xs, weight, bias, activation="silu", position_ids=None))

    torch._dynamo.reset()
    s_got = state.clone()
    got = torch.compile(step, fullgraph=True, backend="eager")(x1, xs, s_got, weight, bias)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(s_got, s_want)
