"""accel.nn.SigmoidAttention / SigmoidMultiheadAttention, and the sigmoid attention patch rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import accel
from accel import _ext
from accel.patching import PatchWarning, SigmoidAttentionAdapter, register_rule, sigmoid_attention_rule

pytestmark = [pytest.mark.skipif(not _ext.available(), reason=f"accel._C not built: {_ext.load_error()}"),
              pytest.mark.usefixtures("clean_patch_state")]

if _ext.available():
    from accel.nn import AdaptedSigmoidMultiheadAttention, SigmoidAttention, SigmoidMultiheadAttention
    from accel.reference import SigmoidMultiheadAttention as ReferenceMHA
    from accel.reference import sigmoid_attention as reference

REFERENCE_RULE = "reference.SigmoidMultiheadAttention->SigmoidMultiheadAttention"




def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def masked_formula(q, k, v, allowed, bias=None):
    """The definition: ``sigmoid(QK^T / sqrt(D) + b) * allowed @ V`` with ``b = -log(#allowed keys of the row's
    sequence)``; ``q`` ``(B, H, L, D)``, ``k``/``v`` ``(B, H, S, D)``, ``allowed`` ``(B, L, S)``, ``keys`` per batch
    counted as the keys any query may see."""
    d = q.shape[-1]
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is None:
        n = allowed.any(1).sum(1).clamp(min=1).to(q.dtype)  # (B,)
        s = s - torch.log(n).view(-1, 1, 1, 1)
    else:
        s = s + bias
    return (torch.sigmoid(s) * allowed.unsqueeze(1).to(q.dtype)) @ v


def project(mha, query, key, value):
    """Eager projections of an MHA-style module (batch first), heads split: (B, H, L, D)."""
    E, H = mha.embed_dim, mha.num_heads
    b = [None] * 3 if mha.in_proj_bias is None else mha.in_proj_bias.chunk(3)
    if mha.in_proj_weight is not None:
        w = mha.in_proj_weight.chunk(3)
    else:
        w = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, b))
    split = lambda t: t.view(t.shape[0], t.shape[1], H, E // H).transpose(1, 2)
    return split(q), split(k), split(v)


def merge_out(mha, o):
    B, H, L, D = o.shape
    return mha.out_proj(o.transpose(1, 2).reshape(B, L, H * D))


# ---------------------------------------------------------------- SigmoidAttention

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (3, 0)), (False, (2, 1))])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("bias", [None, -1.5, "tensor"])
def test_sigmoid_attention_matches_reference(causal, window, hkv, bias):
    q = randn(2, 4, 9, 16, seed=1)
    k, v = randn(2, hkv, 13, 16, seed=2), randn(2, hkv, 13, 16, seed=3)
    if bias == "tensor":
        bias = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    m = SigmoidAttention(bias=bias, causal=causal, window=window)
    want = reference(q, k, v, bias=bias, causal=causal, window=window)
    close(m(q, k, v), want)


def test_sigmoid_attention_overrides_alibi_scale_and_strides():
    slopes = torch.tensor([0.5, 0.25, 0.125])
    m = SigmoidAttention(scale=0.3, alibi_slopes=slopes)
    x = randn(2, 11, 3, 8, seed=4)  # (B, L, H, D): transpose gives a strided (B, H, L, D) view
    q = k = v = x.transpose(1, 2)
    close(m(q, k, v), reference(q, k, v, scale=0.3, alibi_slopes=slopes))
    close(m(q, k, v, causal=True, window=(2, 0), scale=0.1),
          reference(q, k, v, scale=0.1, causal=True, window=(2, 0), alibi_slopes=slopes))
    assert m.state_dict() == {}  # stateless: bias/slopes are non-persistent buffers
    assert "alibi=True" in repr(m) and "scale=0.3" in repr(m)
    assert "bias=-log(L_k)" in repr(SigmoidAttention())


def test_sigmoid_attention_gradients_match_reference():
    q = randn(1, 2, 7, 8, seed=5, dtype=torch.float64).requires_grad_()
    k = randn(1, 2, 10, 8, seed=6, dtype=torch.float64).requires_grad_()
    v = randn(1, 2, 10, 8, seed=7, dtype=torch.float64).requires_grad_()
    m = SigmoidAttention(causal=True, bias=-1.0)
    g = randn(1, 2, 7, 8, seed=8, dtype=torch.float64)
    got = torch.autograd.grad(m(q, k, v), (q, k, v), g)
    want = torch.autograd.grad(reference(q, k, v, causal=True, bias=-1.0), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(window=(1,)), ValueError, "pair"),
    (dict(window=(-2, 0)), ValueError, ">= 0"),
    (dict(causal=True, window=(2, 2)), ValueError, "right window of 2"),
    (dict(bias="big"), TypeError, "bias must be"),
    (dict(bias=torch.zeros(2, 2)), ValueError, r"bias must have shape \(H_q,\) = \(2,\), got \[2, 2\]"),
    (dict(bias=torch.zeros(2, requires_grad=True)), ValueError, "not require grad"),
    (dict(scale="1"), TypeError, "scale"),
])
def test_sigmoid_attention_argument_errors(kwargs, error, match):
    # conversions fail in the constructor, ranges and shapes in the op's own checks at the first call
    q = randn(1, 2, 4, 8, seed=40)
    with pytest.raises(error, match=match):
        SigmoidAttention(**kwargs)(q, q, q)


# ---------------------------------------------------------------- SigmoidMultiheadAttention: parameters

MHA_CONFIGS = [
    dict(),
    dict(bias=False),
    dict(kdim=12, vdim=20),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
]


@pytest.mark.parametrize("cfg", MHA_CONFIGS)
def test_state_dict_interchangeable_with_multihead_attention(cfg):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(32, 4, **cfg)
    mine = SigmoidMultiheadAttention(32, 4, **cfg)
    shapes = lambda m: [(k, v.shape) for k, v in m.state_dict().items()]
    assert shapes(mine) == shapes(theirs)
    mine.load_state_dict(theirs.state_dict())
    for name, p in theirs.state_dict().items():
        assert torch.equal(mine.state_dict()[name], p)
    theirs.load_state_dict(SigmoidMultiheadAttention(32, 4, **cfg).state_dict())


def test_state_dict_interchangeable_with_reference():
    ref = ReferenceMHA(32, 4)
    mine = SigmoidMultiheadAttention(32, 4, batch_first=True)
    assert list(mine.state_dict()) == list(ref.state_dict())
    mine.load_state_dict(ref.state_dict())
    x = randn(2, 9, 32, seed=9)
    close(mine(x, x, x)[0], ref(x, x, x))
    ref.load_state_dict(SigmoidMultiheadAttention(32, 4, batch_first=True).state_dict())
    no_bias = ReferenceMHA(32, 4, bias=False)
    assert list(SigmoidMultiheadAttention(32, 4, bias=False).state_dict()) == list(no_bias.state_dict())


def test_from_module_shares_parameters():
    ref = ReferenceMHA(16, 2, attn_bias=-2.0)
    fused = SigmoidMultiheadAttention.from_module(ref)
    assert fused.in_proj_weight is ref.in_proj_weight and fused.out_proj.weight is ref.out_proj.weight
    assert fused.in_proj_bias is ref.in_proj_bias and fused.attn_bias == -2.0 and fused.batch_first
    x = randn(3, 5, 16, seed=10)
    out, weights = fused(x, x, x, is_causal=True)
    assert weights is None
    close(out, ref(x, x, x, is_causal=True))

    mha = nn.MultiheadAttention(16, 2, kdim=6, vdim=10)  # softmax -> sigmoid: same parameters, sigmoid maths
    fused = SigmoidMultiheadAttention.from_module(mha)
    assert fused.k_proj_weight is mha.k_proj_weight and fused.in_proj_weight is None and not fused.batch_first
    q, k, v = randn(4, 2, 16, seed=11), randn(7, 2, 6, seed=12), randn(7, 2, 10, seed=13)
    bq, bk, bv = (t.transpose(0, 1) for t in (q, k, v))
    pq, pk, pv = project(fused, bq, bk, bv)
    want = merge_out(fused, reference(pq, pk, pv)).transpose(0, 1)
    close(fused(q, k, v)[0], want)
    with pytest.raises(TypeError, match="expects"):
        SigmoidMultiheadAttention.from_module(nn.Linear(2, 2))


# ---------------------------------------------------------------- SigmoidMultiheadAttention: forward

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("attn_bias", [None, -1.0, "tensor"])
def test_matches_reference_module_forward_and_gradients(causal, attn_bias):
    if attn_bias == "tensor":
        attn_bias = torch.tensor([-1.0, -2.0, -3.0, -0.5])
    torch.manual_seed(0)
    ref = ReferenceMHA(32, 4, attn_bias=attn_bias).double()
    fused = SigmoidMultiheadAttention.from_module(ref)
    q = randn(2, 7, 32, seed=14, dtype=torch.float64).requires_grad_()
    kv = randn(2, 7 if causal else 10, 32, seed=15, dtype=torch.float64).requires_grad_()
    out = fused(q, kv, kv, is_causal=causal)[0]
    want = ref(q, kv, kv, is_causal=causal)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    params = [q, kv] + list(ref.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)


def test_batch_first_both_ways_and_unbatched():
    torch.manual_seed(0)
    first = SigmoidMultiheadAttention(16, 4, batch_first=True)
    second = SigmoidMultiheadAttention(16, 4, batch_first=False)
    second.load_state_dict(first.state_dict())
    x = randn(3, 6, 16, seed=16)
    close(second(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1))[0].transpose(0, 1), first(x, x, x)[0])
    close(first(x[1], x[1], x[1])[0], first(x, x, x)[0][1])
    close(second(x[1], x[1], x[1], is_causal=True)[0], first(x, x, x, is_causal=True)[0][1])


@pytest.mark.parametrize("cfg", [dict(kdim=12, vdim=20), dict(add_bias_kv=True), dict(add_zero_attn=True),
                                 dict(add_bias_kv=True, add_zero_attn=True, bias=False)])
def test_kdim_vdim_and_extra_keys_match_the_formula(cfg):
    torch.manual_seed(0)
    m = SigmoidMultiheadAttention(16, 2, batch_first=True, **cfg)
    q = randn(2, 5, 16, seed=17)
    k, v = randn(2, 8, m.kdim, seed=18), randn(2, 8, m.vdim, seed=19)
    pq, pk, pv = project(m, q, k, v)
    extra_k, extra_v = [], []
    if m.bias_k is not None:
        extra_k.append(m.bias_k.view(1, 2, 1, 8).expand(2, 2, 1, 8))
        extra_v.append(m.bias_v.view(1, 2, 1, 8).expand(2, 2, 1, 8))
    if m.add_zero_attn:
        extra_k.append(pk.new_zeros(2, 2, 1, 8))
        extra_v.append(pv.new_zeros(2, 2, 1, 8))
    pk, pv = torch.cat([pk] + extra_k, 2), torch.cat([pv] + extra_v, 2)
    close(m(q, k, v)[0], merge_out(m, reference(pq, pk, pv)))


def _padding(lengths, total, left=False):
    valid = torch.zeros(len(lengths), total, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            valid[b, total - n:] = True
        else:
            valid[b, :n] = True
    return valid


@pytest.mark.parametrize("as_float", [False, True])
def test_key_padding_mask_non_causal_any_pattern(as_float):
    torch.manual_seed(0)
    m = SigmoidMultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)
    q, kv = randn(3, 4, 16, seed=20), randn(3, 9, 16, seed=21)
    valid = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 1, 1], [1] * 9, [0, 0, 0, 1, 0, 0, 1, 0, 0]], dtype=torch.bool)
    kpm = torch.zeros(3, 9).masked_fill(~valid, float("-inf")) if as_float else ~valid
    pq, pk, pv = project(m, q, kv, kv)
    pk = torch.cat([pk, m.bias_k.view(1, 2, 1, 8).expand(3, 2, 1, 8)], 2)
    pv = torch.cat([pv, m.bias_v.view(1, 2, 1, 8).expand(3, 2, 1, 8)], 2)
    allowed = F.pad(valid, (0, 1), value=True).unsqueeze(1).expand(3, 4, 10)
    close(m(q, kv, kv, key_padding_mask=kpm)[0], merge_out(m, masked_formula(pq, pk, pv, allowed)))
    # a sequence is unaffected by the others' padding: batch row 2 alone, its padding removed
    keep = valid[2].nonzero().squeeze(1)
    close(m(q, kv, kv, key_padding_mask=kpm)[0][2:], m(q[2:], kv[2:, keep], kv[2:, keep])[0])


def test_key_padding_mask_causal_right_padding():
    torch.manual_seed(0)
    m = SigmoidMultiheadAttention(16, 2, batch_first=True).double()
    x = randn(3, 7, 16, seed=22, dtype=torch.float64).requires_grad_()
    valid = _padding([7, 4, 1], 7)
    out = m(x, x, x, key_padding_mask=~valid, is_causal=True)[0]
    pq, pk, pv = project(m, x, x, x)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed = causal.unsqueeze(0) & valid.unsqueeze(1)  # padded query rows see every valid key
    want = merge_out(m, masked_formula(pq, pk, pv, allowed))
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    params = [x] + list(m.parameters())
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b)
    # valid positions equal each sequence run alone
    torch.testing.assert_close(out[1, :4], m(x[1:2, :4], x[1:2, :4], x[1:2, :4], is_causal=True)[0][0])


def test_key_padding_mask_unsupported_combinations():
    m = SigmoidMultiheadAttention(16, 2, batch_first=True)
    x = randn(2, 6, 16, seed=23)
    with pytest.raises(NotImplementedError, match="right padding"):
        m(x, x, x, key_padding_mask=~_padding([6, 3], 6, left=True), is_causal=True)
    with pytest.raises(NotImplementedError, match="L == S"):
        m(x[:, :4], x, x, key_padding_mask=~_padding([6, 3], 6), is_causal=True)
    with pytest.raises(ValueError, match="shape"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="only hold 0"):
        m(x, x, x, key_padding_mask=torch.full((2, 6), 0.5))
    windowed = SigmoidMultiheadAttention(16, 2, batch_first=True, window=(2, 2))
    with pytest.raises(NotImplementedError, match="sliding window"):
        windowed(x, x, x, key_padding_mask=~_padding([6, 3], 6))
    close(m(x, x, x, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))[0], m(x, x, x)[0])  # nothing padded


def test_attn_mask_causal_forms_map_to_causal():
    torch.manual_seed(0)
    m = SigmoidMultiheadAttention(16, 2, batch_first=True)
    q, kv = randn(2, 5, 16, seed=24), randn(2, 8, 16, seed=25)
    want = m(q, kv, kv, is_causal=True)[0]
    blocked = torch.ones(5, 8, dtype=torch.bool).triu(8 - 5 + 1)  # bottom-right: key j > i + S - L
    close(m(q, kv, kv, attn_mask=blocked)[0], want)
    close(m(q, kv, kv, attn_mask=torch.zeros(5, 8).masked_fill(blocked, float("-inf")), is_causal=True)[0], want)
    close(m(q, kv, kv, attn_mask=blocked.expand(4, 5, 8))[0], want)
    close(m(q, kv, kv, attn_mask=torch.zeros(5, 8, dtype=torch.bool))[0], m(q, kv, kv)[0])
    assert not torch.allclose(want, m(q, kv, kv)[0])


@pytest.mark.parametrize("mask,match", [
    (torch.ones(5, 8, dtype=torch.bool).triu(1), "neither empty nor the causal mask"),  # top-left, not bottom-right
    (torch.full((5, 8), -1.0), "only hold 0"),
    (torch.zeros(4, 8, dtype=torch.bool), "shape"),
])
def test_attn_mask_errors(mask, match):
    m = SigmoidMultiheadAttention(16, 2, batch_first=True)
    q, kv = randn(2, 5, 16, seed=26), randn(2, 8, 16, seed=27)
    with pytest.raises(ValueError, match=match):
        m(q, kv, kv, attn_mask=mask)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_forward_errors_are_clear():
    m = SigmoidMultiheadAttention(16, 2, dropout=0.1, batch_first=True)
    x = randn(2, 4, 16, seed=28)
    with pytest.raises(NotImplementedError, match="no dropout"):
        m(x, x, x)
    m.eval()
    m(x, x, x)  # dropout is inactive in eval mode
    with pytest.raises(NotImplementedError, match="need_weights=False"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="feature sizes"):
        m(x, x[..., :8], x)
    with pytest.raises(ValueError, match="is_causal=True but attn_mask masks nothing"):
        m(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.bool), is_causal=True)
    with pytest.raises(NotImplementedError, match="add_bias_kv/add_zero_attn"):
        SigmoidMultiheadAttention(16, 2, add_zero_attn=True, batch_first=True)(x, x, x, is_causal=True)
    with pytest.raises(NotImplementedError, match="nested"):
        nested = torch.nested.nested_tensor([x[0], x[1, :2]])
        m(nested, nested, nested)
    with pytest.raises(ValueError, match="divisible"):
        SigmoidMultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"bias must have shape \(H_q,\) = \(2,\), got \[3\]"):
        SigmoidMultiheadAttention(16, 2, attn_bias=torch.zeros(3), batch_first=True).eval()(x, x, x)


def test_transformer_encoder_layer_calls_it_in_eval_mode():
    """nn.TransformerEncoderLayer's eval fast path would run softmax on our weights; it must call us instead."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    layer.self_attn = SigmoidMultiheadAttention.from_module(layer.self_attn)
    x = randn(2, 5, 16, seed=29)
    train_out = layer.train()(x)
    with torch.no_grad():
        close(layer.eval()(x), train_out.detach())


def test_extra_repr():
    r = repr(SigmoidMultiheadAttention(16, 2, kdim=4, vdim=4, attn_bias=-1.0, window=(3, 3), add_zero_attn=True))
    assert "embed_dim=16, num_heads=2, kdim=4, vdim=4" in r and "attn_bias=-1" in r and "window=(3, 3)" in r


# ---------------------------------------------------------------- torch.compile

def test_compile_fullgraph_forward_and_backward():
    torch.manual_seed(0)
    m = SigmoidMultiheadAttention(32, 4, batch_first=True)
    x = randn(2, 9, 32, seed=30).requires_grad_()
    want = m(x, x, x, is_causal=True)[0]
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x] + list(m.parameters()), g)
    compiled = torch.compile(m, fullgraph=True)
    got = compiled(x, x, x, is_causal=True)[0]
    close(got, want)
    for a, b in zip(torch.autograd.grad(got, [x] + list(m.parameters()), g), want_grads):
        close(a, b, 1e-4)
    core = torch.compile(SigmoidAttention(causal=True, bias=-1.0), fullgraph=True)
    q = randn(1, 2, 6, 8, seed=31)
    close(core(q, q, q), reference(q, q, q, causal=True, bias=-1.0))


# ---------------------------------------------------------------- patching

class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.attn = ReferenceMHA(32, 4, **kw)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, is_causal=True)


def test_patch_replaces_reference_module_keeping_its_call_signature():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(attn_bias=-2.0))
    originals = dict(model.named_modules())
    x = randn(2, 7, 32, seed=32).requires_grad_()
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), [x] + list(model.parameters()))
    report = accel.patch(model)
    assert [(e.path, e.new, e.rule) for e in report.replaced] == [
        ("0.attn", "AdaptedSigmoidMultiheadAttention", REFERENCE_RULE),
        ("1.attn", "AdaptedSigmoidMultiheadAttention", REFERENCE_RULE)]
    fused = model[0].attn
    assert isinstance(fused, AdaptedSigmoidMultiheadAttention)
    assert fused.in_proj_weight is originals["0.attn"].in_proj_weight  # shared, not copied
    out = model(x)
    close(out, want)
    assert isinstance(fused(x, x, x), torch.Tensor)  # the reference's return, not (output, None)
    for a, b in zip(torch.autograd.grad(out.square().sum(), [x] + list(model.parameters())), want_grads):
        close(a, b, 1e-4)
    assert {e.path: e.reason for e in accel.patch(model).skipped}["0.attn"] == "already patched"
    assert accel.unpatch(model) == 2
    assert all(dict(model.named_modules())[k] is v for k, v in originals.items())


def test_patch_skips_with_reasons(monkeypatch):
    learnable = ReferenceMHA(32, 4)
    learnable.attn_bias = torch.full((4,), -1.0, requires_grad=True)
    with pytest.raises(ValueError, match="no attention dropout"):
        ReferenceMHA(32, 4, dropout=0.1)
    dropped = ReferenceMHA(32, 4)
    dropped.dropout = 0.1  # set after construction: the rule still refuses to guess
    model = nn.Sequential(dropped, learnable)
    reasons = {e.path: e.reason for e in accel.patch(model).skipped}
    assert reasons["0"].startswith("dropout=0.1: the reference module stores it without applying it")
    assert reasons["1"] == "attn_bias is a learnable tensor: the fused kernel does not differentiate it"

    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "load_error", lambda: ImportError("no _C here"))
    model = nn.Sequential(ReferenceMHA(32, 4))
    assert {e.reason for e in accel.patch(model).skipped} == {"accel native extension not built: no _C here"}


def test_patch_skips_device_without_kernel(monkeypatch):
    from accel.ops import Capability

    real = Capability.has_kernels
    monkeypatch.setattr(Capability, "has_kernels", lambda cap, dev: cap.name != "sigmoid_attention" and real(cap, dev))
    model = nn.Sequential(ReferenceMHA(32, 4))
    assert {e.reason for e in accel.patch(model).skipped} == {"this accel build has no cpu kernels for sigmoid_attention"}


def test_patch_before_compile_fullgraph():
    torch.manual_seed(0)
    model = nn.Sequential(Block())
    x = randn(2, 6, 32, seed=33)
    want = model(x)
    accel.patch(model)
    close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), want)


class PackedQKVAttention(nn.Module):
    """A third-party sigmoid attention layer with its own parameter names and call convention."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, causal=True):
        B, L, E = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, E // self.heads).permute(2, 0, 3, 1, 4)
        o = reference(q, k, v, causal=causal)
        return self.proj(o.transpose(1, 2).reshape(B, L, E))


PACKED_ADAPTER = SigmoidAttentionAdapter(
    options=lambda m: dict(embed_dim=m.proj.in_features, num_heads=m.heads, batch_first=True),
    parameters=lambda m: {"in_proj_weight": m.qkv.weight, "in_proj_bias": m.qkv.bias,
                          "out_proj.weight": m.proj.weight, "out_proj.bias": m.proj.bias},
    call=lambda fused, x, causal=True: fused.attend(x, x, x, is_causal=causal),
    check=lambda m: "odd heads are not supported here" if m.heads % 2 else None,
)


def test_rule_factory_for_a_plugin_declared_class():
    torch.manual_seed(0)
    rule = register_rule(sigmoid_attention_rule(PackedQKVAttention, PACKED_ADAPTER))
    assert rule.name == "PackedQKVAttention->SigmoidMultiheadAttention" and rule.op == "sigmoid_attention"
    model = nn.Sequential(PackedQKVAttention(32, 4), PackedQKVAttention(32, 1))
    original = model[0]
    x = randn(2, 6, 32, seed=34)
    want = (model(x), model[0](x, causal=False))
    report = accel.patch(model)
    assert [e.path for e in report.replaced] == ["0"]
    assert {e.path: e.reason for e in report.skipped} == {"1": "odd heads are not supported here"}
    assert model[0].in_proj_weight is original.qkv.weight and model[0].out_proj.bias is original.proj.bias
    assert model[0].replaces == "PackedQKVAttention"
    close(model(x), want[0])
    close(model[0](x, causal=False), want[1])
    accel.unpatch(model)
    assert type(model[0]) is PackedQKVAttention


def test_rule_factory_build_failure_is_reported():
    bad = SigmoidAttentionAdapter(options=lambda m: dict(embed_dim=32, num_heads=4, batch_first=True),
                                  parameters=lambda m: {"in_proj_weight": m.qkv.weight})  # out_proj missing
    register_rule(sigmoid_attention_rule(PackedQKVAttention, bad, name="incomplete"))
    model = nn.Sequential(PackedQKVAttention(32, 4))
    with pytest.warns(PatchWarning, match="no tensor given for parameter"):
        report = accel.patch(model)
    assert len(report) == 0 and type(model[0]) is PackedQKVAttention
    with pytest.raises(TypeError, match="SigmoidAttentionAdapter"):
        sigmoid_attention_rule(PackedQKVAttention, object())
