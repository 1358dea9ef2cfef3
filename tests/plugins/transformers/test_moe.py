"""The accel-transformers plugin's mixture of experts: accel.patch replacing sparse MoE blocks by FusedMoE,
FusedMoE.from_module on the blocks the plugin registers, and experts_implementation="accel".

Tiny random-weight Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE and OLMoE causal LMs are built here
(nothing is downloaded); the oracle is the same model with transformers' eager experts loop.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from accel import _ext
from accel.patching import unmet_requirement
from accel.patching.builtin import op_reason

if unmet_requirement("transformers>=5"):
    pytest.skip(f"accel-transformers {unmet_requirement('transformers>=5')}", allow_module_level=True)
if not _ext.available():
    pytest.skip(f"accel._C not built: {_ext.load_error()}", allow_module_level=True)
_missing = op_reason("fused_moe", torch.device("cpu"))
if _missing:
    pytest.skip(f"no fused_moe CPU kernel: {_missing}", allow_module_level=True)
accel_transformers = pytest.importorskip(
    "accel_transformers", reason="the plugin is not installed: pip install -e plugins/transformers --no-deps")

import accel  # noqa: E402
from accel.nn import FusedMoE  # noqa: E402
from accel.nn.fused_moe import registered_moe_blocks  # noqa: E402
from accel_transformers import moe as plugin_moe  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

pytestmark = pytest.mark.usefixtures("clean_patch_state")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
          "qwen3_moe": "Qwen3MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock"}
TOL = dict(rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- tiny models

def config(family, **kw):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=128, num_experts_per_tok=2)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=96, num_local_experts=4, **common, **kw)
    if family == "qwen2_moe":  # the shared expert and its sigmoid gate; odd expert size; top-k weights as is
        return Qwen2MoeConfig(intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=48,
                              num_experts=8, **common, **kw)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=40, num_experts=8, norm_topk_prob=True,
                              **common, **kw)
    return OlmoeConfig(intermediate_size=40, num_experts=6, **common, **kw)


def build(family, experts_implementation="eager", dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **kw), experts_implementation=experts_implementation)
    return model.to(dtype).eval()


def tokens(batch=2, length=12, seed=0):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def moe_paths(model):
    return [name for name, m in model.named_modules() if type(m).__name__ in BLOCKS.values()]


def train_step(model, ids, **kw):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kw)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_same_step(got, want, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name, g in got[1].items():
        w = want[1][name]
        if w is None:  # an expert the eager loop never touched has no gradient; the fused one has zeros
            assert g is None or not g.any(), name
            continue
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------- registration

def test_registered_with_the_plugin():
    assert ALL_EXPERTS_FUNCTIONS["accel"] is plugin_moe.accel_experts_forward
    assert accel_transformers.registered()
    accel_transformers.register()  # idempotent
    assert plugin_moe.MOE_BLOCK_RULE in accel_transformers.plugin.rules
    # the classes the rule matches are the ones the plugin registered with FusedMoE.from_module
    assert set(plugin_moe.MOE_BLOCK_RULE.classes) == set(plugin_moe.MOE_BLOCKS)
    assert set(plugin_moe.MOE_BLOCKS) <= set(registered_moe_blocks())


# ---------------------------------------------------------------- accel.patch: blocks -> FusedMoE

@pytest.mark.parametrize("family", FAMILIES)
def test_patch_replaces_blocks_with_same_logits_and_unpatch_restores(family):
    model = build(family)
    oracle = copy.deepcopy(model)
    originals = {p: model.get_submodule(p) for p in moe_paths(model)}
    assert len(originals) == 2
    keys = list(model.state_dict())
    ids = tokens()

    report = accel.patch(model)
    replaced = {r.path: r for r in report.replaced}
    assert set(replaced) == set(originals), report
    for path, original in originals.items():
        assert replaced[path].original == BLOCKS[family] and replaced[path].new == "FusedMoE"
        assert replaced[path].rule == plugin_moe.MOE_BLOCK_RULE.name
        fused = model.get_submodule(path)
        assert isinstance(fused, FusedMoE) and fused.gate_up_proj is original.experts.gate_up_proj
    assert list(model.state_dict()) == keys  # checkpoints keep their keys
    assert "FusedMoE" in str(report)

    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, oracle(ids).logits, **TOL)
    assert accel.patch(model).replaced == []  # idempotent

    assert accel.unpatch(model) == 2
    for path, original in originals.items():
        assert model.get_submodule(path) is original


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router_logits", [False, True], ids=["loss", "loss+aux"])
def test_patched_training_step_matches_eager(family, router_logits):
    """One training step: same loss and gradients. With output_router_logits=True the load-balancing loss
    needs the router logits, which transformers records with hooks on the router FusedMoE keeps."""
    model = build(family)
    oracle = copy.deepcopy(model)
    accel.patch(model)
    ids = tokens(seed=1)
    got = train_step(model, ids, output_router_logits=router_logits)
    want = train_step(oracle, ids, output_router_logits=router_logits)
    assert_same_step(got, want)
    assert got[1]["model.layers.1.mlp.gate.weight"].abs().sum() > 0
    assert got[1]["model.layers.0.mlp.experts.gate_up_proj"].abs().sum() > 0


def test_patched_model_saves_a_loadable_checkpoint(tmp_path):
    """FusedMoE keeps the blocks' state_dict keys, so save_pretrained of a patched model loads as the original."""
    model = build("qwen2_moe")
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    accel.patch(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded.model.layers[0].mlp).__name__ == "Qwen2MoeSparseMoeBlock"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, **TOL)


def test_weights_assigned_while_patched_survive_unpatch():
    """FusedMoE holds the block's own submodules, so load_state_dict(assign=True) reaches the originals."""
    model = build("mixtral")
    donor = build("mixtral", seed=1)
    originals = [model.get_submodule(p) for p in moe_paths(model)]
    accel.patch(model)
    model.load_state_dict(donor.state_dict(), assign=True)
    ids = tokens()
    with torch.no_grad():
        want = donor(ids).logits
        torch.testing.assert_close(model(ids).logits, want, **TOL)
        accel.unpatch(model)
        assert [model.get_submodule(p) for p in moe_paths(model)] == originals
        torch.testing.assert_close(model(ids).logits, want, **TOL)


@pytest.mark.parametrize("mode", ["patch", "experts_implementation"])
def test_compile_fullgraph(mode):
    model = build("qwen2_moe", "accel" if mode == "experts_implementation" else "eager")
    ids = tokens()
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        if mode == "patch":
            accel.patch(model)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, **TOL)


def test_patched_mixtral_jitter_noise_matches_eager():
    model = build("mixtral", router_jitter_noise=0.1)
    oracle = copy.deepcopy(model)
    accel.patch(model)
    ids = tokens(seed=2)
    torch.manual_seed(5)
    got = train_step(model, ids)
    torch.manual_seed(5)
    want = train_step(oracle, ids)
    assert_same_step(got, want)


def test_patch_skips_with_reasons():
    model = build("olmoe", hidden_act="gelu_pytorch_tanh")
    report = accel.patch(model)
    assert report.replaced == []
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["model.layers.0.mlp"] == "experts activation GELUTanh has no fused kernel"

    model = build("qwen3_moe")
    model.model.layers[0].mlp.experts.register_forward_hook(lambda *args: None)
    report = accel.patch(model)
    assert [r.path for r in report.replaced] == ["model.layers.1.mlp"]
    assert "hooks" in {s.path: s.reason for s in report.skipped}["model.layers.0.mlp"]

    report = accel.patch(build("mixtral"), exclude="fused_moe")
    assert report.replaced == []
    assert {s.path: s.reason for s in report.skipped}["model.layers.0.mlp"] == "excluded (op 'fused_moe')"


# ---------------------------------------------------------------- experts_implementation="accel"

@pytest.mark.parametrize("family", FAMILIES)
def test_experts_implementation_same_logits_and_training_step(family):
    fused = build(family, "accel")
    assert fused.config._experts_implementation == "accel"
    oracle = build(family, "eager")
    ids = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("error", plugin_moe.ExpertsFallbackWarning)  # the fused path, no fallback
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, oracle(ids).logits, **TOL)
        got = train_step(fused, ids, output_router_logits=True)
    assert_same_step(got, train_step(oracle, ids, output_router_logits=True))


def test_set_experts_implementation_and_back():
    model = build("qwen2_moe", "eager")
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("accel")
        assert model.config._experts_implementation == "accel"
        torch.testing.assert_close(model(ids).logits, want, **TOL)
        model.set_experts_implementation("eager")
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_experts_fall_back_to_eager_and_warn_once():
    plugin_moe._warned.clear()
    model = build("olmoe", "accel", hidden_act="gelu_pytorch_tanh")
    oracle = build("olmoe", "eager", hidden_act="gelu_pytorch_tanh")
    ids = tokens()
    with pytest.warns(plugin_moe.ExpertsFallbackWarning, match="GELUTanh has no fused kernel") as record:
        with torch.no_grad():
            got = model(ids).logits
    assert len([w for w in record if issubclass(w.category, plugin_moe.ExpertsFallbackWarning)]) == 1  # 2 layers
    torch.testing.assert_close(got, oracle(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- bf16

@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_smoke(family):
    reference = build(family, "eager")
    patched = build(family, "eager", dtype=torch.bfloat16)
    assert len(accel.patch(patched).replaced) == 2
    experts = build(family, "accel", dtype=torch.bfloat16)
    ids = tokens(length=8)
    with torch.no_grad():
        want = reference(ids).logits
        for model in (patched, experts):
            got = model(ids).logits
            assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
            assert ((got.float() - want).norm() / want.norm()).item() < 5e-2
    for model in (patched, experts):
        loss, grads = train_step(model, ids)
        assert torch.isfinite(loss)
        assert all(g is None or torch.isfinite(g).all() for g in grads.values())


# ---------------------------------------------------------------- FusedMoE.from_module on the registered blocks

BLOCK_TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_block(family, seed=0, **kw):
    """One sparse MoE block from a tiny config, every parameter random (the blocks leave some uninitialised)."""
    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1, vocab_size=64)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = MixtralConfig(intermediate_size=40, num_local_experts=4, num_experts_per_tok=2, **common, **kw)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
        config = Qwen2MoeConfig(moe_intermediate_size=20, shared_expert_intermediate_size=24, num_experts=6,
                                   num_experts_per_tok=2, **common, **kw)
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        config = Qwen3MoeConfig(moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3, **common, **kw)
    else:
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        config = OlmoeConfig(intermediate_size=20, num_experts=5, num_experts_per_tok=2, **common, **kw)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = Block(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("family,kw", [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen2_moe", dict(norm_topk_prob=True)),
    ("qwen3_moe", dict(norm_topk_prob=True)),
    ("qwen3_moe", dict(norm_topk_prob=False)),
    ("olmoe", {}),
    ("olmoe", dict(hidden_act="gelu")),
])
def test_from_module_matches_block(family, kw):
    block = tiny_block(family, **kw)
    moe = FusedMoE.from_module(block)
    # shared, not copied
    assert moe.gate is block.gate and moe.experts is block.experts
    assert moe.gate_up_proj is block.experts.gate_up_proj and moe.down_proj is block.experts.down_proj
    assert moe.state_dict().keys() == block.state_dict().keys()
    router = block.gate
    assert moe.top_k == router.top_k and moe.num_experts == block.experts.gate_up_proj.shape[0]
    assert moe.renormalize == getattr(router, "norm_topk_prob", True)
    assert moe.activation == kw.get("hidden_act", "silu")
    if family == "qwen2_moe":
        assert moe.shared_expert is block.shared_expert and moe.shared_expert_gate is block.shared_expert_gate
        assert moe.shared_expert_intermediate_size == 24
    else:
        assert moe.shared_expert is None
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = moe(x)
    out.pow(2).sum().backward()
    got = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad(set_to_none=True)
    x.grad = None
    want = block(x)
    want.pow(2).sum().backward()
    torch.testing.assert_close(out, want, **BLOCK_TOL)
    for (name, p), g in zip(block.named_parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
    torch.testing.assert_close(got[-1], x.grad, rtol=1e-4, atol=1e-5)


def test_from_module_mixtral_jitter_reproduces_transformers():
    block = tiny_block("mixtral", router_jitter_noise=0.1).train()
    moe = FusedMoE.from_module(block)
    assert moe.training and moe.jitter_noise == pytest.approx(0.1)
    x = torch.randn(2, 4, 32)
    torch.manual_seed(7)
    got = moe(x)
    torch.manual_seed(7)
    want = block(x.clone())  # transformers jitters its input in place
    torch.testing.assert_close(got, want, **BLOCK_TOL)


def test_from_module_calls_a_hooked_router():
    """transformers records router logits (output_router_logits) with forward hooks on the router."""
    block = tiny_block("qwen3_moe", norm_topk_prob=True)
    moe = FusedMoE.from_module(block)
    recorded = []
    handle = block.gate.register_forward_hook(lambda m, args, out: recorded.append(out[0]))
    x = torch.randn(3, 32)[None]
    out = moe(x)
    handle.remove()
    assert len(recorded) == 1 and recorded[0].shape == (3, 6)
    torch.testing.assert_close(recorded[0], F.linear(x[0], block.gate.weight))
    torch.testing.assert_close(out, block(x), **BLOCK_TOL)


def test_from_module_rejects_what_it_cannot_run():
    with pytest.raises(TypeError, match="MixtralSparseMoeBlock"):
        FusedMoE.from_module(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="GELUTanh"):
        FusedMoE.from_module(tiny_block("olmoe", hidden_act="gelu_pytorch_tanh"))
    block = tiny_block("mixtral")
    block.gate = nn.Linear(32, 4, bias=False)
    with pytest.raises(TypeError, match="MixtralTopKRouter"):
        FusedMoE.from_module(block)
