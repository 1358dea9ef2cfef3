"""The op contract, checked for every op the capability records declare (none is listed here by hand).

Each op must have: a pure-PyTorch reference that agrees with it, a fake (meta) kernel for every
registered op, ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` passing on its examples,
fp64 gradients that pass ``gradcheck``, drop-in modules, a benchmark case and a doc page. Every op
registered in the ``accel`` namespace belongs to exactly one record.
"""
from __future__ import annotations

import dataclasses
import importlib
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from accel import _ext

if not _ext.available():  # pragma: no cover
    pytest.skip("accel._C is not built", allow_module_level=True)

from accel.ops import capabilities  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
CAPS = capabilities()
NAMES = sorted(CAPS)
CPU = torch.device("cpu")


def _examples(name, dtype=torch.float64):
    return CAPS[name].examples(CPU, dtype)


def _example_ids():
    return [(name, i) for name in NAMES for i in range(len(_examples(name)))]


def _clone(obj, keep_grad=True):
    """Fresh leaves (same values, same requires_grad) so that every run starts from the same state."""
    def one(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone().requires_grad_(keep_grad and x.requires_grad)
        return x
    return tree_map(one, obj)


def _fresh(example):
    return dataclasses.replace(example, args=_clone(example.args), kwargs=_clone(dict(example.kwargs)))


def _reference(name, example):
    if example.reference is not None:
        return example.reference
    return getattr(importlib.import_module(f"accel.reference.{name}"), example.fn.__name__)


class _RecordAccelOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "accel":
            # a backward op runs with grad mode off: its saved inputs are not differentiated through it
            grad = torch.is_grad_enabled()
            self.calls.append((func, _clone(args, grad), _clone(kwargs, grad)))
        return func(*args, **kwargs)


def _tensors(out):
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _run_with_backward(example):
    out = example.fn(*example.args, **example.kwargs)
    grads = [t for t in _tensors(out) if t.requires_grad]
    if grads:
        torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
    return out


# --------------------------------------------------------------------------- the records themselves

def test_every_registered_op_has_a_record():
    declared = {op for cap in CAPS.values() for op in cap.qualified_ops}
    registered = {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("accel::")}
    assert registered == declared, (f"registered but in no capability record: {sorted(registered - declared)}; "
                                    f"declared but not registered: {sorted(declared - registered)}")


@pytest.mark.parametrize("name", NAMES)
def test_record_points_at_real_things(name):
    cap = CAPS[name]
    ops_module = importlib.import_module(f"accel.ops.{name}")
    reference = importlib.import_module(f"accel.reference.{name}")
    import accel.nn
    import accel.ops

    for fn in cap.functions:
        assert getattr(accel.ops, fn) is getattr(ops_module, fn)
    referenced = {ex.fn.__name__ for ex in _examples(name) if ex.reference is None}
    for fn in referenced:
        assert callable(getattr(reference, fn, None)), f"accel.reference.{name} has no {fn}"
    assert {ex.fn.__name__ for ex in _examples(name)} == set(cap.functions), "every public function needs an example"
    for module in cap.modules:
        assert isinstance(getattr(accel.nn, module), type)
    assert cap.has_kernels("cpu")
    for device_type, dtypes in cap.dtypes.items():
        assert dtypes and all(isinstance(d, torch.dtype) for d in dtypes), device_type


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_op_has_a_fake_kernel(name):
    from torch._library.simple_registry import singleton

    for op in CAPS[name].qualified_ops:
        assert singleton.find(op).fake_impl.kernel is not None, f"{op} has no register_fake"


@pytest.mark.parametrize("name", NAMES)
def test_doc_page_covers_the_op(name):
    cap = CAPS[name]
    page = ROOT / cap.doc
    assert page.is_file(), f"{cap.doc} is missing"
    text = page.read_text()
    for fn in cap.functions:
        assert fn in text, f"{cap.doc} does not mention {fn}"


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_has_cases(name):
    from accel.bench import harness

    cap = CAPS[name]
    assert cap.bench in harness.OPS
    args = harness.parse_args([cap.bench, "--size", "tiny"])
    cases = importlib.import_module(harness.OPS[cap.bench]).cases(args)
    assert cases, f"accel.bench {cap.bench} has no case at --tiny"


# --------------------------------------------------------------------------- the examples

@pytest.mark.parametrize("name,index", _example_ids())
def test_example_matches_reference(name, index):
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        if dtype not in CAPS[name].dtypes["cpu"]:
            continue
        example = _examples(name, dtype)[index]
        ours, theirs = _fresh(example), _fresh(example)
        out = _run_with_backward(ours)
        ref = _reference(name, example)(*theirs.args, **theirs.kwargs)
        grads = [t for t in _tensors(ref) if t.requires_grad]
        if grads:
            torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
        for a, b in zip(_tensors(out), _tensors(ref)):
            assert a.dtype == b.dtype, f"{example.label}: dtype {a.dtype} vs reference {b.dtype}"
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{example.label}, {dtype}: {m}")
            else:
                assert torch.equal(a, b), example.label
        # gradients and in-place updated state (a KV cache) agree too
        for a, b in zip(_tensors((ours.args, ours.kwargs)), _tensors((theirs.args, theirs.kwargs))):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            if a.grad is not None or b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol,
                                           msg=lambda m: f"{example.label}, {dtype} gradient: {m}")


@pytest.mark.parametrize("name,index", _example_ids())
def test_example_opcheck(name, index):
    example = _examples(name)[index]
    mode = _RecordAccelOps()
    with mode:
        _run_with_backward(_fresh(example))
    assert mode.calls, f"{example.label} reached no accel op"
    for func, args, kwargs in mode.calls:
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.parametrize("name,index", _example_ids())
def test_example_compiles_fullgraph(name, index):
    example = _examples(name, torch.float32)[index]
    eager, compiled = _fresh(example), _fresh(example)
    torch._dynamo.reset()
    fn = torch.compile(example.fn, fullgraph=True, dynamic=False)
    expected = eager.fn(*eager.args, **eager.kwargs)
    got = fn(*compiled.args, **compiled.kwargs)
    for a, b in zip(_tensors(got), _tensors(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(_tensors((compiled.args, compiled.kwargs)), _tensors((eager.args, eager.kwargs))):
        torch.testing.assert_close(a, b)  # state an op updates in place


@pytest.mark.parametrize("name,index", _example_ids())
def test_example_gradcheck_fp64(name, index):
    example = _examples(name)[index]
    leaves = [t for t in _tensors((example.args, example.kwargs)) if t.requires_grad]
    if not leaves:
        pytest.skip(f"{example.label}: nothing differentiable")
    flat, spec = tree_flatten((example.args, dict(example.kwargs)))
    positions = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]

    def fn(*inputs):
        values = list(flat)
        for i, t in zip(positions, inputs):
            values[i] = t
        args, kwargs = spec.unflatten(values)
        return tuple(t for t in _tensors(example.fn(*args, **kwargs)) if t.is_floating_point())

    assert torch.autograd.gradcheck(fn, tuple(flat[i] for i in positions), fast_mode=True)


# --------------------------------------------------------------------------- accel.info

def test_info_prints_every_record():
    from accel._info import format_info, info

    data = info(print_it=False)
    text = format_info(data)
    assert set(data["kernels"]) == set(CAPS)
    for name, cap in CAPS.items():
        assert name in text and all(k in text for k in cap.limits)
    if not data["built_with_cuda"]:
        assert "CUDA kernels: absent" in text


def test_info_warns_when_the_gpu_has_no_kernel(monkeypatch):
    from accel._info import format_info, info

    data = info(print_it=False)
    data["built_with_cuda"] = True
    data["gpu_kernel_image"] = {"runs": False, "detail": "compute capability 7.5 has no kernel in this build"}
    text = format_info(data)
    assert "WARNING: this GPU cannot run accel's CUDA kernels: compute capability 7.5" in text
    assert "CUDA kernels: absent" not in text


@pytest.mark.parametrize("name", NAMES)
def test_sanitize_examples_are_valid_calls(name):
    """The sanitizer's shapes run on a GPU only under compute-sanitizer: make sure they are valid calls."""
    cap = CAPS[name]
    if cap.sanitize_examples is None:
        pytest.skip(f"{name} has no sanitize examples")
    for example in cap.sanitize_examples(CPU, torch.float32):
        _run_with_backward(example)
