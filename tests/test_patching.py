"""accel.patch / accel.unpatch: rules, report, undo, filters, torch.compile, kill switch."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import accel
from accel import _ext
from accel.patching import PatchWarning, Rule, bind_method, register_rule, rules as rules_mod
from accel.patching.core import _STATE_ATTR

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"accel._C not built: {_ext.load_error()}")

DILATED_CONV_RULE = "conv1d->DilatedConv1d"


pytestmark = pytest.mark.usefixtures("clean_patch_state")


class Chomp(nn.Module):
    """Drops the right padding of a causal conv padded (K-1)*d on both sides (the classic TCN block)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        return x[..., : -self.n].contiguous()


class ConvNet(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.causal = nn.Conv1d(c, c, 3, padding=2 * 4, dilation=4, groups=c)  # depthwise dilated
        self.chomp = Chomp(2 * 4)
        self.dilated = nn.Conv1d(c, c, 3, padding=2, dilation=2)  # dense dilated
        self.same = nn.Conv1d(c, c, 4, padding="same", dilation=2, groups=c)  # even K, 'same'
        self.block = nn.Sequential(nn.Conv1d(c, c, 5, padding=2, groups=c), nn.GELU())  # depthwise, d=1
        self.reflect = nn.Conv1d(c, c, 3, padding=2, dilation=2, padding_mode="reflect")
        self.dense = nn.Conv1d(c, c, 3, padding=1)
        self.strided = nn.Conv1d(c, c, 3, stride=2, padding=1, dilation=2)

    def forward(self, x):
        x = self.chomp(self.causal(x))
        x = self.dilated(x)
        x = self.same(x)
        x = self.block(x)
        x = self.reflect(x)
        x = self.dense(x)
        return self.strided(x)


ACCELERATED = {"causal", "dilated", "same", "block.0"}
SKIP_REASONS = {
    "reflect": "padding_mode 'reflect' is not zeros",
    "dense": "dense undilated conv: nn.Conv1d (oneDNN) is already the fastest kernel for it",
    "strided": "stride 2 != 1",
}


class TanhLike(nn.Module):
    """A throwaway replacement that computes exactly what nn.Tanh does."""

    def forward(self, x):
        return torch.tanh(x)


def tanh_rule(**kw) -> Rule:
    return Rule(name=kw.pop("name", "tanh->TanhLike"), op=kw.pop("op", "test_tanh"), classes=(nn.Tanh,),
                build=lambda m: TanhLike(), **kw)


def make_model(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet().eval()


def x_input(length: int = 40) -> torch.Tensor:
    return torch.randn(2, 8, length, generator=torch.Generator().manual_seed(1))


def skipped(report) -> dict:
    return {e.path: e.reason for e in report.skipped}


# ---------------------------------------------------------------- without the native extension

def test_import_does_not_load_ops():
    import subprocess
    import sys

    code = "import sys, accel; print(any(m in sys.modules for m in ('accel.ops', 'accel.nn')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_rejections_need_no_extension(monkeypatch):
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "load_error", lambda: ImportError("no _C here"))
    model = make_model()
    before = dict(model.named_modules())
    ref = model(x_input())
    report = accel.patch(model)
    reasons = skipped(report)
    assert len(report) == 0 and report.replaced == []
    for path, why in SKIP_REASONS.items():
        assert reasons[path] == why
    for path in ACCELERATED:
        assert reasons[path] == "accel native extension not built: no _C here"
    assert dict(model.named_modules()) == before
    torch.testing.assert_close(model(x_input()), ref, rtol=0, atol=0)


def test_no_kernel_for_device(monkeypatch):
    from accel.ops import Capability

    monkeypatch.setattr(Capability, "has_kernels", lambda cap, device_type: False)
    reasons = skipped(accel.patch(make_model()))
    assert reasons["causal"] == "this accel build has no cpu kernels for dilated_conv1d"


def test_unsupported_dtype_reason():
    model = nn.Sequential(nn.Conv1d(4, 4, 3, dilation=2, groups=4, dtype=torch.complex64))
    assert skipped(accel.patch(model))["0"] == "dtype complex64 has no dilated_conv1d kernel on cpu"


def test_cuda_reason_names_the_missing_arch(monkeypatch):
    """A GPU whose compute capability has no kernel in the build is skipped with that reason, not swapped in."""
    from accel.ops import Capability, _capability

    monkeypatch.setattr(Capability, "has_kernels", lambda cap, device_type: True)
    monkeypatch.setattr(_capability, "built_cuda_archs", lambda: ("sm_80", "sm_90"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    reason = accel.ops.capability("dilated_conv1d").unsupported_reason(torch.device("cuda"), torch.float32)
    assert reason.startswith("compute capability 7.5 has no kernel in this build (built for sm_80, sm_90)")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert accel.ops.capability("dilated_conv1d").unsupported_reason(torch.device("cuda"), torch.float32) is None
    monkeypatch.setattr(_capability, "built_cuda_archs", lambda: ("sm_80", "compute_80"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    reason = accel.ops.capability("sigmoid_attention").unsupported_reason(torch.device("cuda"), torch.bfloat16)
    assert reason.startswith("compute capability 7.0 has no kernel")


@pytest.mark.parametrize("arch,cc,runs", [
    ("sm_80", (8, 0), True), ("sm_80", (8, 6), True), ("sm_80", (9, 0), False), ("sm_90", (8, 9), False),
    ("sm_90", (9, 0), True), ("compute_90", (10, 0), True), ("compute_90", (8, 9), False), ("sm_90a", (9, 0), True),
    ("sm_100a", (10, 3), False),
])
def test_arch_runs_on(arch, cc, runs):
    from accel.ops._capability import arch_runs_on

    assert arch_runs_on(arch, cc) is runs


def test_rule_validation():
    with pytest.raises(ValueError, match="exactly one of build"):
        Rule(name="r", op="o", classes=(nn.Tanh,))
    with pytest.raises(ValueError, match="exactly one of build"):
        Rule(name="r", op="o", classes=(nn.Tanh,), build=lambda m: m, apply=lambda m: (lambda: None))
    with pytest.raises(TypeError, match="classes"):
        Rule(name="r", op="o", classes=(3,), build=lambda m: m)
    register_rule(tanh_rule())
    with pytest.raises(ValueError, match="already registered"):
        register_rule(tanh_rule())


def test_throwaway_rule_replace_and_unpatch():
    register_rule(tanh_rule())
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Sequential(nn.Tanh()))
    originals = dict(model.named_modules())
    x = torch.randn(2, 3)
    ref = model(x)
    report = accel.patch(model)
    assert [(e.path, e.original, e.new, e.rule) for e in report.replaced] == [
        ("1", "Tanh", "TanhLike", "tanh->TanhLike"), ("2.0", "Tanh", "TanhLike", "tanh->TanhLike")]
    assert isinstance(model[1], TanhLike) and isinstance(model[2][0], TanhLike)
    torch.testing.assert_close(model(x), ref)
    assert accel.unpatch(model) == 2
    assert all(dict(model.named_modules())[k] is v for k, v in originals.items())
    assert not hasattr(model, _STATE_ATTR)
    assert accel.unpatch(model) == 0


def test_per_instance_and_no_global_monkeypatch():
    register_rule(tanh_rule())
    forward = nn.Tanh.forward
    a = nn.Sequential(nn.Tanh())
    b = nn.Sequential(nn.Tanh())
    accel.patch(a)
    assert isinstance(a[0], TanhLike) and type(b[0]) is nn.Tanh
    assert nn.Tanh.forward is forward


def test_shared_module_replaced_everywhere():
    register_rule(tanh_rule())
    shared = nn.Tanh()
    model = nn.Sequential(shared, nn.Linear(2, 2), shared)
    report = accel.patch(model)
    assert len(report) == 1
    assert model[0] is model[2] and isinstance(model[0], TanhLike)
    accel.unpatch(model)
    assert model[0] is shared and model[2] is shared


def test_subclass_not_captured_unless_asked():
    class MyTanh(nn.Tanh):
        def forward(self, x):
            return super().forward(x) * 2

    register_rule(tanh_rule())
    model = nn.Sequential(MyTanh())
    report = accel.patch(model)
    assert len(report) == 0
    assert "matches the exact class only" in skipped(report)["0"]
    register_rule(tanh_rule(name="any tanh", subclasses=True))
    # registered rules are tried in order: the exact one does not match, the subclass one does
    assert [e.rule for e in accel.patch(model).replaced] == ["any tanh"]


def test_class_named_by_dotted_path():
    register_rule(Rule(name="by-path", op="test_tanh", classes=("torch.nn.modules.activation.Tanh",),
                       build=lambda m: TanhLike()))
    model = nn.Sequential(nn.Tanh())
    assert [e.rule for e in accel.patch(model).replaced] == ["by-path"]


def test_hooks_block_replacement():
    register_rule(tanh_rule())
    model = nn.Sequential(nn.Tanh())
    model[0].register_forward_hook(lambda m, i, o: o * 3)
    reason = skipped(accel.patch(model))["0"]
    assert reason == "has forward hooks; a replacement would drop them"


def test_root_module_is_not_replaced():
    register_rule(tanh_rule())
    tanh = nn.Tanh()
    report = accel.patch(tanh)
    assert len(report) == 0 and "is the model itself" in skipped(report)[""]
    assert report.model is tanh


def test_changes_math_needs_convert():
    register_rule(Rule(name="tanh->hardtanh", op="test_hardtanh", classes=(nn.Tanh,), build=lambda m: nn.Hardtanh(),
                       changes_math=True, conversion=("activation", "hardtanh")))
    model = nn.Sequential(nn.Tanh())
    report = accel.patch(model)
    assert len(report) == 0
    assert skipped(report)["0"] == "changes the maths: opt in with convert={'activation': 'hardtanh'}"
    assert len(accel.patch(model, convert={"activation": "other"})) == 0
    with pytest.raises(ValueError, match="unknown conversion"):
        accel.patch(model, convert={"no_such_conversion": True})
    report = accel.patch(model, convert={"activation": "hardtanh"})
    assert [e.new for e in report.replaced] == ["Hardtanh"]


def test_first_applicable_rule_wins_and_reasons_are_combined():
    register_rule(tanh_rule(name="never", check=lambda m: "not today"))
    register_rule(tanh_rule(name="fallback"))
    assert [e.rule for e in accel.patch(nn.Sequential(nn.Tanh())).replaced] == ["fallback"]
    rules_mod._registered[:] = []
    register_rule(tanh_rule(name="a", check=lambda m: "reason a"))
    register_rule(tanh_rule(name="b", check=lambda m: "reason b"))
    assert skipped(accel.patch(nn.Sequential(nn.Tanh())))["0"] == "a: reason a; b: reason b"


def test_method_patch_rule():
    def fast_forward(self, x):
        return torch.tanh(x)

    register_rule(Rule(name="tanh.forward", op="test_tanh_method", classes=(nn.Tanh,),
                       apply=lambda m: bind_method(m, "forward", fast_forward)))
    a, b = nn.Tanh(), nn.Tanh()
    model = nn.Sequential(a, b)
    report = accel.patch(model)
    assert [(e.path, e.class_name, e.rule) for e in report.patched_methods] == [
        ("0", "Tanh", "tanh.forward"), ("1", "Tanh", "tanh.forward")]
    assert len(report) == 2 and "forward" in a.__dict__
    assert skipped(accel.patch(model)) == {"0": "already patched", "1": "already patched"}
    assert accel.unpatch(model) == 2
    assert "forward" not in a.__dict__ and model[0] is a


def test_failing_rule_warns_or_raises_with_rollback():
    def boom(m):
        raise RuntimeError("kaboom")

    register_rule(tanh_rule(name="good"))
    register_rule(Rule(name="bad", op="test_bad", classes=(nn.ReLU,), build=boom))
    model = nn.Sequential(nn.Tanh(), nn.ReLU())
    with pytest.warns(PatchWarning, match="kaboom"):
        report = accel.patch(model, inplace=False)
    assert skipped(report)["1"] == "rule bad failed: RuntimeError: kaboom"
    assert [e.path for e in report.replaced] == ["0"]
    tanh = model[0]
    with pytest.raises(RuntimeError, match="'bad' failed on '1'"):
        accel.patch(model, strict=True)
    assert model[0] is tanh and not hasattr(model, _STATE_ATTR)  # the replacement of "0" was rolled back


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op"):
        accel.patch(make_model(), ops={"dilated_conv"})


def test_exclude_by_path_and_glob_and_op():
    register_rule(tanh_rule())
    model = nn.Sequential(nn.Tanh(), nn.Sequential(nn.Tanh(), nn.Tanh()), nn.Tanh())
    report = accel.patch(model, exclude=["1", "2"], inplace=False)
    assert [e.path for e in report.replaced] == ["0"]
    assert skipped(report) == {"1.0": "excluded by exclude='1'", "1.1": "excluded by exclude='1'",
                               "2": "excluded by exclude='2'"}
    report = accel.patch(model, exclude="*.1", inplace=False)
    assert {e.path for e in report.replaced} == {"0", "1.0", "2"}
    report = accel.patch(model, exclude={"test_tanh"}, inplace=False)
    assert len(report) == 0 and set(skipped(report).values()) == {"excluded (op 'test_tanh')"}
    assert all(type(m) is nn.Tanh for m in model.modules() if not isinstance(m, nn.Sequential))


def test_kill_switch(monkeypatch):
    register_rule(tanh_rule())
    monkeypatch.setenv("ACCEL_DISABLE", "1")
    model = nn.Sequential(nn.Tanh())
    report = accel.patch(model)
    assert len(report) == 0 and report.disabled == "disabled by ACCEL_DISABLE"
    assert "disabled by ACCEL_DISABLE" in str(report)
    assert type(model[0]) is nn.Tanh
    monkeypatch.setenv("ACCEL_DISABLE", "0")
    assert len(accel.patch(model)) == 1


def test_report_table():
    register_rule(tanh_rule())
    model = nn.Sequential(nn.Tanh(), nn.Conv1d(2, 2, 3, stride=2))
    text = str(accel.patch(model))
    lines = text.splitlines()
    assert lines[0].startswith("accel.patch: 1 replaced, 0 methods patched, 1 skipped")
    assert "Replaced (1)" in lines and "Skipped (1)" in lines
    header = next(l for l in lines if l.strip().startswith("path") and "reason" in l)
    row = next(l for l in lines if "stride 2 != 1" in l)
    assert header.index("reason") == row.index("stride 2 != 1")  # columns line up
    assert header.index("class") == row.index("Conv1d")
    assert accel.patch(nn.Linear(2, 2)).to_dict()["replaced"] == []


def test_compiled_wrapper_is_unwrapped():
    register_rule(tanh_rule())
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(2, 3)
    ref = compiled(x)
    report = accel.patch(compiled)
    assert report.model is compiled and isinstance(model[1], TanhLike)
    torch.testing.assert_close(compiled(x), ref)
    assert accel.unpatch(compiled) == 1 and type(model[1]) is nn.Tanh


# ---------------------------------------------------------------- with the native extension

@needs_ext
def test_conv_model_outputs_report_and_unpatch():
    from accel.nn import DilatedConv1d

    model = make_model()
    originals = dict(model.named_modules())
    x = x_input()
    ref = model(x)
    report = accel.patch(model)
    assert {e.path for e in report.replaced} == ACCELERATED
    assert all(e.original == "Conv1d" and e.new == "DilatedConv1d" and e.rule == DILATED_CONV_RULE
               for e in report.replaced)
    assert skipped(report) == SKIP_REASONS
    assert len(report) == 4
    patched = dict(model.named_modules())
    for path in ACCELERATED:
        assert type(patched[path]) is DilatedConv1d
        assert patched[path].weight is originals[path].weight  # shared, not copied
        assert patched[path].bias is originals[path].bias
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    text = str(report)
    assert "Replaced (4)" in text and "Skipped (3)" in text and "stride 2 != 1" in text

    assert accel.unpatch(model) == 4
    restored = dict(model.named_modules())
    assert restored.keys() == originals.keys()
    assert all(restored[k] is originals[k] for k in originals)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


@needs_ext
def test_gradients_match_after_patch():
    model = make_model().train()
    x = x_input().requires_grad_()
    model(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_x = x.grad.clone()
    model.zero_grad()
    x.grad = None
    accel.patch(model)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, ref_x, rtol=1e-4, atol=1e-5)


@needs_ext
def test_patch_twice_is_noop():
    model = make_model()
    accel.patch(model)
    modules = dict(model.named_modules())
    again = accel.patch(model)
    assert len(again) == 0
    reasons = skipped(again)
    assert {p for p, r in reasons.items() if r == "already patched"} == ACCELERATED
    assert dict(model.named_modules()) == modules
    assert accel.unpatch(model) == 4


@needs_ext
def test_user_built_accel_module_is_left_alone():
    from accel.nn import DilatedConv1d

    model = nn.Sequential(DilatedConv1d(4, 4, 3, padding="causal", dilation=2, groups=4))
    report = accel.patch(model)
    assert len(report) == 0 and skipped(report) == {"0": "already an accel module"}


@needs_ext
def test_inplace_false_leaves_original():
    from accel.nn import DilatedConv1d

    model = make_model()
    originals = dict(model.named_modules())
    report = accel.patch(model, inplace=False)
    assert report.model is not model
    assert dict(model.named_modules()) == originals
    assert all(type(m) is not DilatedConv1d for m in model.modules())
    assert {p for p, m in report.model.named_modules() if type(m) is DilatedConv1d} == ACCELERATED
    assert report.model.causal.weight is not model.causal.weight
    x = x_input()
    torch.testing.assert_close(report.model(x), model(x), rtol=1e-5, atol=1e-5)


@needs_ext
def test_ops_and_exclude_filters():
    report = accel.patch(make_model(), ops={"dilated_conv1d"})
    assert {e.path for e in report.replaced} == ACCELERATED

    register_rule(tanh_rule())
    model = make_model()
    model.act = nn.Tanh()
    report = accel.patch(model, ops={"test_tanh"})
    assert [e.path for e in report.replaced] == ["act"]
    assert skipped(report)["causal"] == "op 'dilated_conv1d' not selected by ops=['test_tanh']"

    report = accel.patch(make_model(), exclude=["causal", "block.*"])
    assert {e.path for e in report.replaced} == {"dilated", "same"}
    reasons = skipped(report)
    assert reasons["causal"] == "excluded by exclude='causal'" and reasons["block.0"] == "excluded by exclude='block.*'"

    report = accel.patch(make_model(), exclude={"dilated_conv1d"})
    assert len(report) == 0 and skipped(report)["causal"] == "excluded (op 'dilated_conv1d')"


@needs_ext
def test_patch_after_torch_compile():
    from accel.nn import DilatedConv1d

    model = make_model()
    compiled = torch.compile(model, backend="aot_eager")
    x = x_input()
    ref = compiled(x)
    report = accel.patch(compiled)
    assert report.model is compiled and {e.path for e in report.replaced} == ACCELERATED
    assert isinstance(model.causal, DilatedConv1d)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)
    copy_report = accel.patch(compiled, inplace=False)  # already patched: the copy stays as it is
    assert len(copy_report) == 0
    assert accel.unpatch(compiled) == 4 and type(model.causal) is nn.Conv1d


@needs_ext
def test_patch_before_torch_compile():
    model = make_model()
    x = x_input()
    ref = model(x)
    accel.patch(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


@needs_ext
def test_second_instance_untouched():
    a, b = make_model(), make_model()
    accel.patch(a)
    assert all(type(m) in (nn.Conv1d, nn.GELU, Chomp, ConvNet, nn.Sequential) for m in b.modules())
    assert nn.Conv1d.forward is nn.Conv1d.__dict__["forward"]


@needs_ext
def test_deepcopy_of_patched_model_unpatches_its_own_copies():
    model = make_model()
    accel.patch(model)
    clone = copy.deepcopy(model)
    assert accel.unpatch(clone) == 4
    assert type(clone.causal) is nn.Conv1d and type(model.causal) is not nn.Conv1d
    assert clone.causal.weight is not model.causal.weight


@needs_ext
def test_weight_norm_conv_is_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated but common in TCN code
        conv = nn.utils.weight_norm(nn.Conv1d(4, 4, 3, dilation=2, padding=2, groups=4))
    model = nn.Sequential(conv, nn.Conv1d(4, 4, 3, dilation=2, padding=2, groups=4))
    model.add_module("param", nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 4, 3, dilation=2, groups=4)))
    report = accel.patch(model)
    reasons = skipped(report)
    assert reasons["0"].startswith("has forward pre-hooks")
    assert "matches the exact class only" in reasons["param"]
    assert [e.path for e in report.replaced] == ["1"]


def test_wide_dense_dilated_conv_is_skipped_with_reason():
    model = nn.Sequential(nn.Conv1d(64, 64, 3, padding=2, dilation=2), nn.Conv1d(64, 64, 3, padding=2, dilation=2, groups=4))
    report = accel.patch(model)
    assert [e.path for e in report.replaced] == ["1"]
    reasons = {e.path: e.reason for e in report.skipped}
    assert "64 input channels per group > 16" in reasons["0"]
    accel.unpatch(model)


def test_patch_a_model_built_on_meta():
    """Build on meta, patch, then materialise: the fake kernels make meta a supported device."""
    model = nn.Sequential(nn.Conv1d(8, 8, 3, dilation=2, groups=8, padding=2, device="meta"))
    report = accel.patch(model)
    assert [e.path for e in report.replaced] == ["0"]
    model = model.to_empty(device="cpu")
    assert model(torch.randn(1, 8, 16)).shape == (1, 8, 16)
    assert accel.ops.capability("dilated_conv1d").unsupported_reason(torch.device("meta"), torch.int8) == \
        "dtype int8 has no dilated_conv1d kernel on any device"
