"""accel.nn.FusedMoE / FusedExperts: forward and backward against a plain PyTorch mixture of experts, and
FusedMoE.from_module on transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE sparse MoE blocks.

The plain oracle runs every expert on every token and combines them through a dense (T, E) matrix of routing
weights: a different algorithm from both the kernel and accel.reference's per-expert loop.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel import _ext
from accel.patching.builtin import op_reason

if not _ext.available():
    pytest.skip(f"accel._C not built: {_ext.load_error()}", allow_module_level=True)
_missing = op_reason("fused_moe", torch.device("cpu"))
if _missing:
    pytest.skip(f"no fused_moe CPU kernel: {_missing}", allow_module_level=True)

from accel.nn import FusedMoE  # noqa: E402
from accel.nn.fused_moe import FusedExperts, GatedMLP, activation_name  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu, "none": lambda t: t}


# ---------------------------------------------------------------- the plain oracle

def plain_moe(x, gate_weight, gate_up_proj, down_proj, *, top_k, renormalize=True, scoring="softmax",
              activation="silu", router_logits=None, shared=None):
    """Dense mixture of experts; ``shared = (gate_proj, up_proj, down_proj, shared_gate_weight or None)``."""
    H = x.shape[-1]
    flat = x.reshape(-1, H)
    logits = F.linear(flat, gate_weight) if router_logits is None else router_logits.reshape(flat.shape[0], -1)
    scores = logits.float().softmax(-1) if scoring == "softmax" else logits.float().sigmoid()
    weights, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    dense = torch.zeros_like(scores).scatter(1, ids, weights)  # (T, E)
    inter = down_proj.shape[-1]
    gate_up = torch.einsum("th,eih->tei", flat, gate_up_proj)
    h = ACT[activation](gate_up[..., :inter]) * gate_up[..., inter:]
    y = torch.einsum("tei,ehi->teh", h, down_proj)
    out = (y.float() * dense[..., None]).sum(1).to(x.dtype)
    if shared is not None:
        gate_proj, up_proj, down, shared_gate = shared
        s = F.linear(ACT[activation](F.linear(flat, gate_proj)) * F.linear(flat, up_proj), down)
        if shared_gate is not None:
            s = torch.sigmoid(F.linear(flat, shared_gate)) * s
        out = out + s
    return out.reshape(x.shape)


def plain_of(moe: FusedMoE, x, router_logits=None):
    shared = None
    if moe.shared_expert is not None:
        se = moe.shared_expert
        shared = (se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight,
                  moe.shared_expert_gate.weight if moe.shared_expert_gate is not None else None)
    return plain_moe(x, moe.gate.weight if moe.gate is not None else None, moe.gate_up_proj, moe.down_proj,
                     top_k=moe.top_k, renormalize=moe.renormalize, scoring=moe.scoring, activation=moe.activation,
                     router_logits=router_logits, shared=shared)


def make(H=24, I=20, E=6, k=2, seed=0, **kw):
    torch.manual_seed(seed)
    moe = FusedMoE(H, I, E, k, **kw)
    with torch.no_grad():  # O(1) activations, so the comparison tests something
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe


def grads(module, *extra):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in extra]


def zero_grads(module, *extra):
    for t in [*module.parameters(), *extra]:
        t.grad = None


# ---------------------------------------------------------------- FusedMoE against the oracle

@pytest.mark.parametrize("activation", ["silu", "gelu", "relu", "none"])
@pytest.mark.parametrize("renormalize,scoring", [(True, "softmax"), (False, "softmax"), (True, "sigmoid")])
def test_forward_backward_match_plain(activation, renormalize, scoring):
    moe = make(H=24, I=20, E=6, k=2, renormalize=renormalize, scoring=scoring, activation=activation)
    x = torch.randn(3, 5, 24, requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    dy = torch.randn_like(out)
    out.backward(dy)
    got = grads(moe, x)
    zero_grads(moe, x)
    want = plain_of(moe, x)
    want.backward(dy)
    torch.testing.assert_close(out, want, **TOL)
    for name, g, w in zip([n for n, _ in moe.named_parameters()] + ["x"], got, grads(moe, x)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert(gated):
    moe = make(H=16, I=12, E=4, k=1, shared_expert_intermediate_size=20, shared_expert_gate=gated)
    assert isinstance(moe.shared_expert, GatedMLP)
    assert (moe.shared_expert_gate is not None) == gated
    x = torch.randn(7, 16, requires_grad=True)
    out = moe(x)
    out.sum().backward()
    got = grads(moe, x)
    zero_grads(moe, x)
    want = plain_of(moe, x)
    want.sum().backward()
    torch.testing.assert_close(out, want, **TOL)
    for g, w in zip(got, grads(moe, x)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_odd_sizes_top_k_equal_to_experts_and_single_token():
    moe = make(H=13, I=7, E=3, k=3)
    for shape in [(1, 13), (2, 1, 13), (9, 13)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(moe(x), plain_of(moe, x), **TOL)


def test_without_router_takes_logits():
    moe = make(H=16, I=8, E=5, k=2, router=False)
    assert moe.gate is None and "gate.weight" not in moe.state_dict()
    x = torch.randn(2, 3, 16)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    out = moe(x, logits)
    out.sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    want = plain_of(moe, x, router_logits=logits)
    want.sum().backward()
    torch.testing.assert_close(out, want, **TOL)
    torch.testing.assert_close(g, logits.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="router_logits"):
        moe(x)
    with pytest.raises(ValueError, match="router_logits"):
        make(H=16, I=8, E=5, k=2)(x, logits)


def test_bf16_close_to_fp32_oracle():
    moe = make(H=32, I=24, E=4, k=2, shared_expert_intermediate_size=16, shared_expert_gate=True).to(torch.bfloat16)
    x = torch.randn(4, 6, 32, dtype=torch.bfloat16, requires_grad=True)
    out = moe(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters())
    # the oracle in float32 from the same bf16 weights and the same bf16 router logits (so the same routing)
    logits = F.linear(x.detach().reshape(-1, 32), moe.gate.weight.detach())
    ref = copy.deepcopy(moe).float()
    ref.gate = None
    want = plain_of(ref, x.detach().float(), router_logits=logits)
    assert ((out.float() - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=0.1)


def test_jitter_noise_in_training_only():
    moe = make(H=16, I=8, E=4, k=2, jitter_noise=0.2)
    x = torch.randn(2, 5, 16)
    moe.eval()
    torch.testing.assert_close(moe(x), plain_of(moe, x), **TOL)
    moe.train()
    torch.manual_seed(3)
    got = moe(x)
    torch.manual_seed(3)
    jittered = x * torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(got, plain_of(moe, jittered), **TOL)
    assert not torch.allclose(got, plain_of(moe, x), atol=1e-3)


def test_state_dict_keys_extra_repr_and_attributes():
    moe = FusedMoE(64, 40, 8, 2, renormalize=False, shared_expert_intermediate_size=48, shared_expert_gate=True)
    assert list(moe.state_dict()) == [
        "gate.weight", "experts.gate_up_proj", "experts.down_proj", "shared_expert.gate_proj.weight",
        "shared_expert.up_proj.weight", "shared_expert.down_proj.weight", "shared_expert_gate.weight"]
    assert moe.gate_up_proj is moe.experts.gate_up_proj and moe.gate_up_proj.shape == (8, 80, 64)
    assert moe.down_proj is moe.experts.down_proj and moe.down_proj.shape == (8, 64, 40)
    assert moe.extra_repr() == ("hidden_size=64, intermediate_size=40, num_experts=8, top_k=2, renormalize=False, "
                                "scoring='softmax', activation='silu', shared_expert_intermediate_size=48, "
                                "shared_expert_gate=True")
    assert "jitter_noise=0.1" in FusedMoE(8, 4, 2, 1, jitter_noise=0.1).extra_repr()
    assert repr(moe.experts) == "FusedExperts(num_experts=8, hidden_size=64, intermediate_size=40, activation='silu')"
    meta = FusedMoE(8, 4, 2, 1, device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in meta.parameters())


def test_fused_experts_transformers_calling_convention():
    torch.manual_seed(0)
    experts = FusedExperts(5, 16, 12, activation="gelu")
    x = torch.randn(7, 16)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(7)])
    w = torch.rand(7, 2)
    dense = torch.zeros(7, 5).scatter(1, ids, w)
    gate_up = torch.einsum("th,eih->tei", x, experts.gate_up_proj)
    y = torch.einsum("tei,ehi->teh", F.gelu(gate_up[..., :12]) * gate_up[..., 12:], experts.down_proj)
    want = (y * dense[..., None]).sum(1)
    torch.testing.assert_close(experts(x, ids, w), want, **TOL)
    torch.testing.assert_close(experts(x, ids.int(), w.double()), want, **TOL)  # any id / weight dtype


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="tanh"), "activation"),
    (dict(scoring="max"), "scoring"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=7), "top_k"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),
    (dict(jitter_noise=-0.1), "jitter_noise"),
])
def test_bad_arguments(kwargs, match):
    args = dict(hidden_size=8, intermediate_size=4, num_experts=6, top_k=2)
    args.update(kwargs)
    # module options fail in the constructor, the ops' arguments in their own checks at the first call
    with pytest.raises(ValueError, match=match):
        FusedMoE(**args)(torch.randn(3, 8))


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        FusedMoE(8, 4, 2, 1)(torch.randn(3, 9))


def test_activation_names():
    assert activation_name(nn.SiLU()) == "silu"
    assert activation_name(F.silu) == "silu"
    assert activation_name(nn.GELU()) == "gelu"
    assert activation_name(nn.GELU(approximate="tanh")) is None
    assert activation_name(nn.ReLU()) == "relu"
    assert activation_name(nn.Identity()) == "none"
    assert activation_name(nn.Tanh()) is None

    class MySiLU(nn.SiLU):  # a subclass may compute something else
        pass

    assert activation_name(MySiLU()) is None


def test_compile_fullgraph():
    moe = make(H=16, I=8, E=4, k=2, shared_expert_intermediate_size=8, shared_expert_gate=True)
    x = torch.randn(2, 3, 16)
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), moe(x), **TOL)


# ---------------------------------------------------------------- from_module on a registered block family

class ToyRouter(nn.Module):
    """The router interface MoEBlockFamily describes: ``weight`` (E, H), ``top_k``, returns (logits, weights, ids)."""

    def __init__(self, hidden, experts, top_k):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) * 0.3)
        self.top_k = top_k

    def forward(self, x):
        logits = F.linear(x, self.weight)
        weights, ids = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        return logits, weights / weights.sum(-1, keepdim=True), ids


class ToyExperts(nn.Module):
    def __init__(self, experts, hidden, inter):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inter, hidden) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inter) * 0.3)
        self.act_fn = nn.SiLU()


class ToyBlock(nn.Module):
    def __init__(self, hidden=16, inter=12, experts=4, top_k=2):
        super().__init__()
        self.gate = ToyRouter(hidden, experts, top_k)
        self.experts = ToyExperts(experts, hidden, inter)

    def forward(self, x):
        _, weights, ids = self.gate(x)
        dense = torch.zeros(x.shape[0], self.experts.gate_up_proj.shape[0]).scatter(1, ids, weights)
        gate_up = torch.einsum("th,eih->tei", x, self.experts.gate_up_proj)
        inter = gate_up.shape[-1] // 2
        y = torch.einsum("tei,ehi->teh", F.silu(gate_up[..., :inter]) * gate_up[..., inter:], self.experts.down_proj)
        return (y * dense[..., None]).sum(1)


def _path(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def test_from_module_reads_a_registered_family(monkeypatch):
    from accel.nn import fused_moe as nn_moe

    monkeypatch.setattr(nn_moe, "_BLOCK_FAMILIES", {})
    monkeypatch.setattr(nn_moe, "_plugins_loaded", True)  # this test's families only
    torch.manual_seed(0)
    block = ToyBlock()
    with pytest.raises(TypeError, match="ToyBlock"):
        FusedMoE.from_module(block)
    with pytest.raises(TypeError, match="MoEBlockFamily"):
        nn_moe.register_moe_block(_path(ToyBlock), {"router": _path(ToyRouter)})
    family = nn_moe.MoEBlockFamily(router=_path(ToyRouter), experts=_path(ToyExperts), renormalize=lambda r: True)
    nn_moe.register_moe_block(_path(ToyBlock), family)
    assert nn_moe.registered_moe_blocks() == {_path(ToyBlock): family}
    moe = FusedMoE.from_module(block)
    assert moe.gate is block.gate and moe.experts is block.experts and moe.top_k == 2 and moe.renormalize
    assert moe.state_dict().keys() == block.state_dict().keys()
    x = torch.randn(6, 16)
    torch.testing.assert_close(moe(x), block(x), **TOL)
    block.gate = nn.Linear(16, 4, bias=False)
    with pytest.raises(TypeError, match="ToyRouter"):
        FusedMoE.from_module(block)
