"""CPU fused MoE vs the per-expert reference loop: routing, forward, every gradient, errors, compile, opcheck.

Accuracy rule (max-abs error relative to the truth's max-abs, the truth being the reference in fp64 on
the same rounded inputs and the same expert choice):
  fp32: error <= 1e-5 of the truth's scale;
  bf16: error <= 2x the error of the eager reference loop run in bf16 on the same inputs, plus a tiny
        floor (2^-8 of the truth's scale: half a bf16 ulp of the largest value). fp16 (a few cases): the
        same rule with its own floor (2^-11).
The gradient of router_logits is measured against max(|d logits|, |d topk_weights|): with saturated
scores it is a tiny difference of weight-gradient-sized terms, so its rounding error scales with the latter.
Routing is compared through the ids the op chose (scores computed in fp32 by the op may order
near-ties differently from an fp64 truth); the ids themselves are checked to be a valid top-k.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import os
import zlib

import pytest
import torch

import accel
from accel.ops.fused_moe import fused_moe, moe_route
from accel import reference as ref

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16")]
DTYPES_FP16 = DTYPES + [pytest.param(torch.float16, id="fp16")]  # fp16 also runs on CPU: a few cases
ACTIVATIONS = ("silu", "gelu", "relu", "none")


def _floor(dtype) -> float:
    """Relative to the truth's max-abs: half an ulp of the largest value (2^-8 in bf16), what rounding even a
    correctly rounded result to ``dtype`` may cost (matters where a tensor has a handful of elements and the
    eager loop got lucky)."""
    return torch.finfo(dtype).eps / 2

GRAD_NAMES = ("hidden", "gate_up_proj", "down_proj", "route")  # route: topk_weights or router_logits


# ---------------------------------------------------------------- cases and inputs

@dataclasses.dataclass(frozen=True)
class Case:
    T: int
    E: int
    k: int
    H: int
    I: int
    renormalize: bool = True
    scoring: str = "softmax"
    activation: str = "silu"
    # "logits": router_logits given to the op (routing inside, gradient to the logits);
    # "weights": precomputed float32 topk_weights (not normalised) and int64 ids;
    # "weights-dtype": topk_weights in the hidden dtype and int32 ids
    route: str = "logits"
    # "random": a random router; "empty": about half of the experts get no token;
    # "one": every token goes to the same k experts (k = 1: one expert takes everything)
    dist: str = "random"

    @property
    def id(self) -> str:
        opts = [("renorm" if self.renormalize else "raw"), self.scoring, self.activation, self.route, self.dist]
        return f"T{self.T}-E{self.E}-k{self.k}-H{self.H}-I{self.I}-" + "-".join(opts)


def _grid():
    """A cross-section of the issue's grid: every T, every (E, k <= E), odd and even H and I, every option."""
    Ts = (0, 1, 3, 64, 257)
    eks = [(1, 1), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8), (13, 1), (13, 2), (13, 4), (13, 13)]
    his = [(16, 8), (33, 17), (64, 48), (35, 24), (130, 70), (47, 96), (128, 33), (24, 65)]
    routes = ("logits", "weights", "weights-dtype")
    dists = ("random", "random", "empty", "one")
    cases = []
    for i, (E, k) in enumerate(eks):
        for j in range(3):
            n = 3 * i + j
            T = Ts[(i + 2 * j) % len(Ts)]
            H, I = his[(5 * i + j) % len(his)]
            if T * k * H * I > 4_000_000:  # keep the fp64 loops quick: the biggest cases get smaller experts
                H, I = his[(5 * i + j + 1) % 4]
            dist = dists[(i + j) % len(dists)]
            if dist == "empty" and E - (E // 2) < k:  # "empty" needs k experts that do get tokens
                dist = "one"
            cases.append(Case(T, E, k, H, I, renormalize=(n % 3 != 1), scoring=("softmax", "sigmoid")[(i + j) % 2],
                              activation=ACTIVATIONS[n % 4], route=routes[(i + 2 * j) % 3], dist=dist))
    cases += [
        Case(64, 8, 2, 130, 70, scoring="sigmoid", renormalize=False),
        Case(64, 4, 2, 1, 1, route="weights"),  # degenerate sizes: one hidden and one intermediate feature
        Case(17, 8, 2, 2, 3, activation="gelu", dist="empty"),
        Case(257, 13, 4, 96, 160, route="weights-dtype", dist="empty"),  # ~40-80 pairs per used expert
    ]
    return cases


GRID = _grid()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seed(case: Case) -> int:
    return zlib.crc32(case.id.encode()) % 100_000  # stable across processes (unlike hash())


def _experts(E: int, H: int, I: int, dtype, g) -> tuple:
    """gate_up_proj (E, 2I, H) and down_proj (E, H, I), fp64 values rounded to ``dtype``."""
    w1 = torch.randn(E, 2 * I, H, generator=g, dtype=F64) / math.sqrt(H)
    w2 = torch.randn(E, H, I, generator=g, dtype=F64) / math.sqrt(I)
    return w1.to(dtype), w2.to(dtype)


def _router_logits(T: int, E: int, k: int, dist: str, g) -> torch.Tensor:
    """fp64 logits whose top-k follows ``dist`` (margins of ~8 sigmas, so the expert choice is certain)."""
    logits = torch.randn(T, E, generator=g, dtype=F64)
    if dist == "one":
        favoured = torch.randperm(E, generator=g)[:k]
        logits[:, favoured] += 12.0
    elif dist == "empty":
        unused = torch.randperm(E, generator=g)[: E // 2]
        logits[:, unused] -= 12.0
    return logits


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids in descending score order, ties: the lower id first (the op's documented rule)."""
    return torch.sort(-scores, dim=-1, stable=True).indices[:, :k]


def _scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    return logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()


def _route_at(logits: torch.Tensor, ids: torch.Tensor, renormalize: bool, scoring: str, dtype) -> torch.Tensor:
    """The routing weights at the given ids, computed (differentiably) in ``dtype``."""
    w = _scores(logits.to(dtype), scoring).gather(1, ids.long())
    if renormalize and w.numel():
        w = w / w.sum(-1, keepdim=True)
    return w


def _make_inputs(case: Case, dtype) -> dict:
    g = _gen(_seed(case))
    x = torch.randn(case.T, case.H, generator=g, dtype=F64).to(dtype)
    w1, w2 = _experts(case.E, case.H, case.I, dtype, g)
    logits = _router_logits(case.T, case.E, case.k, case.dist, g)
    inp = dict(hidden=x, gate_up_proj=w1, down_proj=w2)
    if case.route == "logits":
        # the router's output in the model's dtype (as F.linear would give it)
        inp["router_logits"] = logits.to(dtype)
    else:
        ids = _stable_topk(_scores(logits, case.scoring), case.k)
        w_dtype = F32 if case.route == "weights" else dtype
        inp["topk_weights"] = torch.rand(case.T, case.k, generator=g, dtype=F64).add_(0.05).to(w_dtype)
        inp["topk_ids"] = ids.to(torch.int64 if case.route == "weights" else torch.int32)
    inp["grad_out"] = torch.randn(case.T, case.H, generator=g, dtype=F64).to(dtype)
    return inp


def _route_leaf_name(inp: dict) -> str:
    return "router_logits" if "router_logits" in inp else "topk_weights"


def _run_accel(case: Case, inp: dict):
    """The op's output, its gradients (hidden, gate_up_proj, down_proj, route) and the ids it routed to."""
    route = _route_leaf_name(inp)
    leaves = {n: inp[n].detach().clone().requires_grad_() for n in ("hidden", "gate_up_proj", "down_proj", route)}
    kw = dict(activation=case.activation)
    if route == "router_logits":
        kw.update(router_logits=leaves[route], top_k=case.k, renormalize=case.renormalize, scoring=case.scoring)
        _, ids = moe_route(inp["router_logits"], case.k, renormalize=case.renormalize, scoring=case.scoring)
    else:
        kw.update(topk_weights=leaves[route], topk_ids=inp["topk_ids"])
        ids = inp["topk_ids"]
    out = fused_moe(leaves["hidden"], leaves["gate_up_proj"], leaves["down_proj"], **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), inp["grad_out"])
    return [out.detach(), *grads], ids


def _run_reference(case: Case, inp: dict, ids: torch.Tensor, compute):
    """The reference loop on the same (rounded) inputs and expert choice: ``([out, *grads], route_scale)``.

    ``compute=torch.float64``: the truth (everything upcast, routing scored in fp64).
    ``compute=None``: the eager loop in the inputs' dtype (routing scored in float32, as transformers does).
    """
    route = _route_leaf_name(inp)
    names = ("hidden", "gate_up_proj", "down_proj", route)
    if compute is None:
        leaves = [inp[n].detach().clone().requires_grad_() for n in names]
    else:
        leaves = [inp[n].detach().to(compute).requires_grad_() for n in names]
    x, w1, w2, r = leaves
    if route == "router_logits":
        weights = _route_at(r, ids, case.renormalize, case.scoring, compute or F32)
    else:
        weights = r
    out = ref.fused_moe(x, w1, w2, topk_weights=weights, topk_ids=ids.long(), activation=case.activation)
    go = inp["grad_out"].to(out.dtype)
    targets = leaves + ([weights] if weights is not r else [])
    if out.numel():
        grads = list(torch.autograd.grad(out, targets, go, allow_unused=True))
    else:
        grads = [None] * len(targets)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, targets)]
    # the scale of the routing gradient: d logits = J^T d weights, and with saturated scores (J tiny) its
    # rounding error still scales with |d weights|, so that is the yardstick when it is larger
    route_scale = max(_scale(g) for g in grads[3:])
    return [out.detach(), *grads[:4]], route_scale


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _scale(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item() if t.numel() else 0.0


def _assert_valid_topk(logits: torch.Tensor, ids: torch.Tensor, k: int, scoring: str) -> None:
    """``ids`` are k distinct experts whose (fp64) scores are the k largest, in descending order."""
    assert ids.shape == (logits.shape[0], k)
    if ids.numel() == 0:
        return
    scores = _scores(logits.double(), scoring)
    chosen = scores.gather(1, ids.long())
    assert (ids.long().sort(-1).values.diff(dim=-1) > 0).all(), "repeated expert in a row"
    slack = 1e-6  # the op scores in float32
    assert (chosen[:, :-1] >= chosen[:, 1:] - slack).all(), "not in descending score order"
    if k < logits.shape[1]:
        rest = scores.scatter(1, ids.long(), -1.0)
        assert (chosen.min(-1).values >= rest.max(-1).values - slack).all(), "a better expert was left out"


def _check(case: Case, inp: dict, dtype, what: str = "") -> None:
    got, ids = _run_accel(case, inp)
    if "router_logits" in inp:
        _assert_valid_topk(inp["router_logits"], ids, case.k, case.scoring)
    assert got[0].dtype == dtype and got[0].shape == (case.T, case.H)
    for name, g, leaf in zip(GRAD_NAMES, got[1:], (inp["hidden"], inp["gate_up_proj"], inp["down_proj"],
                                                    inp[_route_leaf_name(inp)])):
        assert g.shape == leaf.shape and g.dtype == leaf.dtype, (name, g.shape, g.dtype, leaf.shape, leaf.dtype)
    truth, route_scale = _run_reference(case, inp, ids, F64)
    eager = _run_reference(case, inp, ids, None)[0] if dtype != F32 else None
    for i, name in enumerate(("out",) + GRAD_NAMES):
        err, scale = _err(got[i], truth[i]), _scale(truth[i])
        if name == "route":
            scale = max(scale, route_scale)
        if dtype == F32:
            assert err <= 1e-5 * scale, f"{what}{name}: error {err:.3e} > 1e-5 x {scale:.3e}"
        else:
            eager_err = _err(eager[i], truth[i])
            floor = _floor(dtype)
            assert err <= 2 * eager_err + floor * scale, (
                f"{what}{name}: error {err:.3e} > 2 x eager {eager_err:.3e} + {floor:.2e} x {scale:.3e}")


# ---------------------------------------------------------------- the grid

def test_grid_covers_the_issue():
    assert len(GRID) >= 40
    assert {c.T for c in GRID} >= {0, 1, 3, 64, 257}
    assert {c.E for c in GRID} == {1, 4, 8, 13}
    for E in (1, 4, 8, 13):
        assert {c.k for c in GRID if c.E == E} == {k for k in (1, 2, 4, E) if k <= E}
    assert {c.H % 2 for c in GRID} == {0, 1} and {c.I % 2 for c in GRID} == {0, 1}
    assert {c.renormalize for c in GRID} == {True, False}
    assert {c.scoring for c in GRID} == {"softmax", "sigmoid"}
    assert {c.activation for c in GRID} == set(ACTIVATIONS)
    assert {c.route for c in GRID} == {"logits", "weights", "weights-dtype"}
    assert {c.dist for c in GRID} == {"random", "empty", "one"}
    assert {(c.route == "logits", c.scoring, c.renormalize) for c in GRID} >= {
        (True, s, r) for s in ("softmax", "sigmoid") for r in (True, False)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_matches_reference(case, dtype):
    _check(case, _make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES_FP16)
def test_decode_sizes(dtype):
    """T = 1..8 tokens, E 8, top-2 (the streaming path: a few tokens per expert)."""
    for T in range(1, 9):
        case = Case(T, 8, 2, 128, 352, route="logits")
        _check(case, _make_inputs(case, dtype), dtype, what=f"T={T} ")


@pytest.mark.parametrize("dtype", DTYPES_FP16)
@pytest.mark.parametrize("case", [
    Case(257, 8, 2, 130, 70, route="logits"),  # prefill-sized, odd and even sizes
    Case(512, 4, 2, 256, 128, route="weights", activation="silu"),  # ~256 pairs per expert: the GEMM path
    Case(512, 4, 2, 256, 128, route="logits", scoring="sigmoid", renormalize=False, activation="gelu"),
], ids=lambda c: c.id)
def test_prefill_and_gemm_sizes(case, dtype):
    _check(case, _make_inputs(case, dtype), dtype)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_runtime_isa_matches_the_kernels_flags():
    """The run-time ISA checks (CPUID read directly) agree with the kernel's /proc/cpuinfo flags,
    so each dispatch (AVX-512 dots, the bf16 tiles, oneDNN on AMX / AVX512-FP16) goes where the
    CPU can take it."""
    import os

    from accel import _ext

    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    runtime = set(_ext.build_info()["cpu_runtime_isa"])
    forced = os.environ.get("ACCEL_CPU_ISA", "")
    avx512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags and forced != "avx2"
    assert ("avx512" in runtime) == avx512
    assert ("avx512_bf16" in runtime) == (avx512 and "avx512_bf16" in flags and forced != "avx512")
    assert ("avx512_fp16" in runtime) == (avx512 and "avx512_fp16" in flags)
    assert ("amx_bf16" in runtime) == ("amx_bf16" in flags)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["aten", "widen", "tiles"])
@pytest.mark.parametrize("sizes", [(96, 80), (97, 81)], ids=["H96-I80", "H97-I81"])
def test_low_precision_gemm_paths_agree(tmp_path, dtype, mode, sizes):
    """bf16/fp16 experts with many tokens run accel's bf16 tiles (AVX512-BF16 without AMX), oneDNN's
    GEMM (AMX, AVX512-FP16) or the fp32 tiles on widened weights (elsewhere); ACCEL_MOE_LOWP_GEMM
    forces one, read once per process. Each matches the fp32 computation of the same rounded inputs,
    odd sizes (a K with a lone last element) included."""
    import os
    import subprocess
    import sys

    if mode == "tiles" and (dtype != "bfloat16" or "avx512_bf16" not in _cpu_flags()):
        pytest.skip("the bf16 tiles need bf16 and a CPU with AVX512-BF16")
    H, I = sizes
    script = tmp_path / "run.py"
    script.write_text(
        "import torch, sys\n"
        "from accel.ops.fused_moe import fused_moe\n"
        "g = torch.Generator().manual_seed(0)\n"
        f"dt = torch.{dtype}\n"
        f"x = torch.randn(300, {H}, generator=g).to(dt)\n"
        f"w1 = (torch.randn(4, 2 * {I}, {H}, generator=g) * 0.1).to(dt)\n"
        f"w2 = (torch.randn(4, {H}, {I}, generator=g) * 0.1).to(dt)\n"
        "logits = torch.randn(300, 4, generator=g)\n"
        "outs = [fused_moe(x, w1, w2, router_logits=logits, top_k=2)]\n"
        "outs.append(fused_moe(x.float(), w1.float(), w2.float(), router_logits=logits, top_k=2))\n"
        "torch.save(outs, sys.argv[1])\n"
    )
    path = tmp_path / f"{mode}.pt"
    env = dict(os.environ, ACCEL_MOE_LOWP_GEMM=mode, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, str(script), str(path)], check=True, env=env)
    low, full = torch.load(path)
    rel = (low.float() - full).abs().max().item() / full.abs().max().item()
    assert rel < (3e-2 if dtype == "bfloat16" else 5e-3), (mode, rel)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("sizes", [(96, 80), (97, 81), (33, 7)], ids=["H96-I80", "H97-I81", "H33-I7"])
def test_bf16_tiles_fused_activation(act, sizes):
    """The bf16 tiles' up projection applies the activation in registers when the forward saves
    nothing for a backward (no grad), and runs the GEMMs, then the activation over the results, when
    it saves g and u. Both must give the same h up to fp32 rounding inside act() (h is rounded to bf16
    in both), so the outputs are nearly bit-equal; both match fp32 on the same rounded inputs. The
    counts cover 1-3 panels with 16/32/48-token last panels; odd I a lone last feature; one token's
    row is scaled by 1e3 so that the activation sees large |z| (exp overflow and underflow)."""
    from accel import _ext

    runtime = set(_ext.build_info()["cpu_runtime_isa"])
    if "avx512_bf16" not in runtime or "amx_bf16" in runtime or os.environ.get("ACCEL_MOE_LOWP_GEMM"):
        pytest.skip("bf16 tiles are the default path only on AVX512-BF16 CPUs without AMX")
    H, I = sizes
    counts = (9, 16, 17, 33, 48, 49, 97, 131)
    g = _gen(5)
    ids = _ids_with_counts(counts, 2, g)
    T, E = ids.shape[0], len(counts)
    dt = torch.bfloat16
    x = torch.randn(T, H, generator=g).to(dt)
    x[3] *= 1000
    w1 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).to(dt)
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).to(dt)
    tw = torch.rand(T, 2, generator=g).to(dt)
    with torch.no_grad():
        fused = fused_moe(x, w1, w2, topk_weights=tw, topk_ids=ids, activation=act)
    xs = x.clone().requires_grad_(True)
    saved = fused_moe(xs, w1, w2, topk_weights=tw, topk_ids=ids, activation=act).detach()
    full = fused_moe(x.float(), w1.float(), w2.float(), topk_weights=tw.float(), topk_ids=ids, activation=act)
    assert torch.isfinite(fused.float()).all()
    scale = full.abs().amax(dim=1, keepdim=True)  # per token: token 3 is 1e3 larger
    diff = (fused.float() - saved.float()).abs() / scale
    assert diff.max().item() <= 2.0**-7, diff.max().item()
    assert (fused == saved).float().mean().item() > 0.99
    for out in (fused, saved):
        rel = ((out.float() - full).abs() / scale).max().item()
        assert rel < 3e-2, rel


# per-expert pair counts across both kernel paths (streaming for few tokens, GEMM for many)
COUNTS = (0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)


def _ids_with_counts(counts, k: int, g) -> torch.Tensor:
    """(T, k) ids in which expert e appears counts[e] times, never twice in a row, rows shuffled."""
    total = sum(counts)
    assert total % k == 0
    T = total // k
    assert max(counts) <= T
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    # column-major fill of sorted labels: row t gets labels[t], labels[T + t], ... -> distinct if count <= T
    ids = labels.view(k, T).t().contiguous()
    return ids[torch.randperm(T, generator=g)]


@pytest.mark.parametrize("dtype", DTYPES_FP16)
def test_expert_token_counts_from_1_to_129(dtype):
    g = _gen(11)
    ids = _ids_with_counts(COUNTS, 2, g)
    T, E, H, I = ids.shape[0], len(COUNTS), 72, 88
    assert torch.equal(torch.bincount(ids.flatten(), minlength=E), torch.tensor(COUNTS))
    case = Case(T, E, 2, H, I, route="weights")
    inp = _make_inputs(case, dtype)
    inp["topk_ids"] = ids
    _check(case, inp, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_output_for_any_thread_count(dtype):
    """Every task runs once whichever thread claims it (contiguous ranges, leftovers taken from their
    ends): the forward is bit-identical for 1, 2, 3 and 7 threads, including more threads than
    tasks (expert 0 with one token, 3 tasks per phase) and experts on both paths."""
    g = _gen(12)
    dt = getattr(torch, dtype)
    counts = (1, 0, 3, 9, 40, 65, 2, 16, 70)
    ids = _ids_with_counts(counts, 2, g)
    E, H, I = len(counts), 72, 88
    x = torch.randn(ids.shape[0], H, generator=g).to(dt)
    w1 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(dt)
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(dt)
    w = torch.rand(ids.shape, generator=g)
    small = (x[:1], w1[:1], w2[:1], w[:1, :1], torch.zeros(1, 1, dtype=torch.int64))
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 7):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append((fused_moe(x, w1, w2, topk_weights=w, topk_ids=ids),
                             fused_moe(*small[:3], topk_weights=small[3], topk_ids=small[4])))
    finally:
        torch.set_num_threads(before)
    for big, one in outs[1:]:
        assert torch.equal(big, outs[0][0]) and torch.equal(one, outs[0][1])
    assert outs[0][0].isfinite().all()


# ---------------------------------------------------------------- routing edge cases

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2])
def test_all_tokens_to_one_expert(dtype, k):
    case = Case(64, 8, k, 48, 40, route="weights")
    inp = _make_inputs(case, dtype)
    ids = torch.full((64, k), 5, dtype=torch.int64)
    if k == 2:  # every token on the same two experts, in either slot order
        swap = torch.rand(64, generator=_gen(3)) < 0.5
        ids[:, 1] = 2
        ids[swap] = ids[swap].flip(-1)
    inp["topk_ids"] = ids
    _check(case, inp, dtype)
    got, _ = _run_accel(case, inp)
    unused = [e for e in range(8) if e not in ((5,) if k == 1 else (5, 2))]
    assert got[2][unused].abs().max().item() == 0.0 and got[3][unused].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_without_tokens_get_zero_gradients(dtype):
    case = Case(64, 13, 2, 40, 24, route="logits")
    inp = _make_inputs(case, dtype)
    logits = torch.randn(64, 13, generator=_gen(5), dtype=F64)
    used = [0, 5, 12]
    logits[:, [e for e in range(13) if e not in used]] -= 12.0
    inp["router_logits"] = logits.to(dtype)
    _check(case, inp, dtype)
    got, ids = _run_accel(case, inp)
    assert set(ids.unique().tolist()) <= set(used)
    unused = [e for e in range(13) if e not in ids.unique().tolist()]
    assert got[2][unused].abs().max().item() == 0.0 and got[3][unused].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradients_from_reused_buffers(dtype):
    """The CPU backward writes the weight gradients into buffers from accel's block cache (from
    8 MiB up): a buffer freed by one backward comes back, dirty, to the next. Experts without
    tokens must still get exact zeros, and a gradient still alive must not be overwritten."""
    from accel.memory import cpu_cache_stats
    T, E, H, I = 16, 4, 1024, 640  # gate_up_proj's gradient: 4 x 1280 x 1024 elements, >= 8 MiB in bf16
    g = _gen(11)
    x = torch.randn(T, H, generator=g).to(dtype)
    w1 = (torch.randn(E, 2 * I, H, generator=g) * 0.05).to(dtype).requires_grad_()
    w2 = (torch.randn(E, H, I, generator=g) * 0.05).to(dtype).requires_grad_()
    tw = torch.rand(T, 2, generator=g)
    every = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)
    only_one = torch.zeros(T, 1, dtype=torch.long)

    def grads(ids, weights):
        w1.grad = w2.grad = None
        fused_moe(x, w1, w2, topk_weights=weights, topk_ids=ids).sum().backward()
        return w1.grad, w2.grad

    grads(every, tw)  # writes every expert's slice; freed when the next call resets .grad
    hits = cpu_cache_stats()["hits"]
    d1, d2 = grads(only_one, tw[:, :1])  # gets those dirty buffers back
    assert cpu_cache_stats()["hits"] > hits, "the second backward should reuse the first one's buffers"
    assert d1[1:].abs().max().item() == 0.0 and d2[1:].abs().max().item() == 0.0
    assert d1[0].abs().max().item() > 0 and d2[0].abs().max().item() > 0
    kept = (d1.clone(), d2.clone())
    w1.grad = w2.grad = None  # d1, d2 stay alive here: their buffers must not be handed out again
    e1, e2 = grads(every, tw)
    assert torch.equal(d1, kept[0]) and torch.equal(d2, kept[1])
    assert e1.data_ptr() != d1.data_ptr() and e2.data_ptr() != d2.data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
def test_repeated_expert_in_a_row(dtype):
    """ids are only required to lie in [0, E): a token may name the same expert in two slots."""
    case = Case(9, 4, 3, 20, 12, route="weights")
    inp = _make_inputs(case, dtype)
    inp["topk_ids"] = torch.tensor([[1, 1, 2], [0, 0, 0], [3, 2, 3]] * 3, dtype=torch.int64)
    _check(case, inp, dtype)


@pytest.mark.parametrize("route", ["logits", "weights"])
def test_zero_tokens(route):
    case = Case(0, 4, 2, 16, 8, route=route)
    inp = _make_inputs(case, F32)
    got, ids = _run_accel(case, inp)
    assert ids.shape == (0, 2)
    assert got[0].shape == (0, 16) and got[1].shape == (0, 16)
    assert got[2].shape == (4, 16, 16) and got[2].abs().sum().item() == 0.0
    assert got[3].shape == (4, 16, 8) and got[3].abs().sum().item() == 0.0
    assert got[4].shape == ((0, 4) if route == "logits" else (0, 2))
    with torch.no_grad():
        kw = ({"router_logits": inp["router_logits"]} if route == "logits"
              else {"topk_weights": inp["topk_weights"], "topk_ids": inp["topk_ids"]})
        assert fused_moe(inp["hidden"], inp["gate_up_proj"], inp["down_proj"], **kw).shape == (0, 16)


def test_zero_weights_and_unnormalised_weights():
    case = Case(12, 4, 2, 24, 16, route="weights")
    inp = _make_inputs(case, F32)
    tw = inp["topk_weights"].clone()
    tw[::3] = 0.0
    tw[1::3] *= 7.5
    inp["topk_weights"] = tw
    _check(case, inp, F32)
    out = fused_moe(inp["hidden"], inp["gate_up_proj"], inp["down_proj"], topk_weights=tw, topk_ids=inp["topk_ids"])
    assert out[::3].abs().max().item() == 0.0


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_fp64_matches_reference_closely(act):
    """The CPU kernel also runs in fp64 (routing too, for fp64 logits): equal to the fp64 loop to ~1e-10."""
    for route in ("weights-dtype", "weights", "logits"):  # fp64 weights + int32 ids; fp32 weights + int64; logits
        case = Case(37, 6, 3, 29, 22, activation=act, route=route, scoring="sigmoid" if act == "gelu" else "softmax")
        inp = _make_inputs(case, F64)
        got, ids = _run_accel(case, inp)
        truth, route_scale = _run_reference(case, inp, ids, F64)
        for name, a, b in zip(("out",) + GRAD_NAMES, got, truth):
            scale = max(_scale(b), route_scale) if name == "route" else _scale(b)
            tol = 1e-7 if a.dtype == F32 else 1e-10  # float32 topk_weights get a float32 gradient
            assert _err(a, b) <= tol * scale, (route, name, _err(a, b), scale)


# ---------------------------------------------------------------- moe_route

@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
@pytest.mark.parametrize("ek", [(1, 1), (4, 2), (8, 2), (8, 8), (13, 4)], ids=lambda ek: f"E{ek[0]}-k{ek[1]}")
def test_moe_route_matches_reference(ek, renormalize, scoring):
    E, k = ek
    g = _gen(E * 10 + k)
    for dtype in (F32, BF16, F64):
        logits = (torch.randn(70, E, generator=g, dtype=F64) * 2).to(dtype)
        w, ids = moe_route(logits, k, renormalize=renormalize, scoring=scoring)
        assert w.dtype == (F64 if dtype == F64 else F32) and ids.dtype == torch.int64
        assert w.shape == ids.shape == (70, k)
        _assert_valid_topk(logits, ids, k, scoring)
        truth = _route_at(logits.double(), ids, renormalize, scoring, F64)
        assert _err(w, truth) <= (1e-12 if dtype == F64 else 1e-6) * _scale(truth)
        if dtype != BF16:  # bf16 logits tie often; elsewhere the reference's topk agrees
            rw, rids = ref.moe_route(logits, k, renormalize, scoring)
            assert torch.equal(ids, rids)
            torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)
        if renormalize:
            torch.testing.assert_close(w.sum(-1), torch.ones(70, dtype=w.dtype), rtol=1e-6, atol=1e-6)


def test_moe_route_ties_prefer_the_lower_expert_id():
    logits = torch.tensor([[0.5, 2.0, 2.0, 0.5, 2.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0],
                           [3.0, -1.0, 3.0, 3.0, -1.0]])
    for scoring in ("softmax", "sigmoid"):
        _, ids = moe_route(logits, 2, scoring=scoring)
        assert ids.tolist() == [[1, 2], [0, 1], [0, 2]]
        _, ids = moe_route(logits, 4, scoring=scoring)
        assert ids.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [0, 2, 3, 1]]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_moe_route_gradient_matches_fp64(renormalize, scoring):
    logits = torch.randn(50, 8, generator=_gen(1), dtype=F64) * 2
    go = torch.randn(50, 3, generator=_gen(2), dtype=F64)
    for dtype in (F32, F64):
        leaf = logits.to(dtype).requires_grad_()
        w, ids = moe_route(leaf, 3, renormalize=renormalize, scoring=scoring)
        grad, = torch.autograd.grad(w, leaf, go.to(w.dtype))
        assert grad.dtype == dtype
        t_leaf = logits.to(dtype).double().requires_grad_()
        t_w = _route_at(t_leaf, ids, renormalize, scoring, F64)
        truth, t_dw = torch.autograd.grad(t_w, (t_leaf, t_w), go)
        assert _err(grad, truth) <= (1e-10 if dtype == F64 else 1e-6) * max(_scale(truth), _scale(go))


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False], ids=["renorm", "raw"])
def test_moe_route_gradcheck_fp64(renormalize, scoring):
    logits = (torch.arange(18, dtype=F64).view(3, 6) * 0.37)[:, torch.randperm(6, generator=_gen(0))]
    leaf = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: moe_route(t, 3, renormalize=renormalize, scoring=scoring)[0], (leaf,))


# ---------------------------------------------------------------- gradcheck (fp64)

@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_fp64(act):
    g = _gen(7)
    T, E, k, H, I = 5, 3, 2, 4, 3
    x = torch.randn(T, H, generator=g, dtype=F64).requires_grad_()
    w1, w2 = (t.requires_grad_() for t in _experts(E, H, I, F64, g))
    tw = torch.rand(T, k, generator=g, dtype=F64).add_(0.1).requires_grad_()
    ids = torch.tensor([[0, 2], [1, 0], [2, 2], [0, 1], [2, 1]])
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: fused_moe(a, b, c, topk_weights=d, topk_ids=ids, activation=act), (x, w1, w2, tw))
    # through the routing: fp64 logits are scored in fp64 (spread out, so the top-k does not flip)
    logits = (torch.randperm(T * E, generator=g).to(F64).view(T, E) * 0.3).requires_grad_()
    scoring = "sigmoid" if act in ("gelu", "none") else "softmax"
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: fused_moe(a, b, c, router_logits=d, top_k=k, scoring=scoring, activation=act,
                                     renormalize=act != "relu"), (x, w1, w2, logits))


# ---------------------------------------------------------------- layouts, determinism

def test_non_contiguous_inputs():
    T, E, k, H, I = 33, 5, 2, 24, 20
    g = _gen(9)
    # leaves whose views are the op's inputs: strided rows, (E, 2I, H) with H not innermost, ...
    big = [torch.randn(T, 2 * H, generator=g), torch.randn(E, H, 2 * I, generator=g) / 5,
           torch.randn(E, I, H, generator=g) / 5, torch.rand(T, 2 * k, generator=g)]
    views = [lambda t: t[:, ::2], lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2), lambda t: t[:, ::2]]
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).t().contiguous().t()
    go = torch.randn(T, H, generator=g)
    leaves = [b.clone().requires_grad_() for b in big]
    args = [v(t) for v, t in zip(views, leaves)]
    assert not any(t.is_contiguous() for t in args + [ids])
    cargs = [v(t).contiguous().requires_grad_() for v, t in zip(views, big)]
    out = fused_moe(*args[:3], topk_weights=args[3], topk_ids=ids)
    cout = fused_moe(*cargs[:3], topk_weights=cargs[3], topk_ids=ids.contiguous())
    torch.testing.assert_close(out, cout, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(out, leaves, go)
    for v, a, b in zip(views, grads, torch.autograd.grad(cout, cargs, go)):
        torch.testing.assert_close(v(a), b, rtol=1e-6, atol=1e-6)
    assert grads[0][:, 1::2].abs().max().item() == 0.0
    x, w1, w2 = args[0].detach(), args[1].detach(), args[2].detach()
    logits = torch.randn(E, T, generator=g).t()
    torch.testing.assert_close(fused_moe(x, w1, w2, router_logits=logits),
                               fused_moe(x, w1, w2, router_logits=logits.contiguous()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype):
    """The same inputs twice give bitwise-equal outputs and gradients (both kernel paths)."""
    ids = _ids_with_counts(COUNTS, 2, _gen(13))
    case = Case(ids.shape[0], len(COUNTS), 2, 64, 80, route="weights")
    inp = _make_inputs(case, dtype)
    inp["topk_ids"] = ids
    a, _ = _run_accel(case, inp)
    b, _ = _run_accel(case, inp)
    for name, x, y in zip(("out",) + GRAD_NAMES, a, b):
        assert torch.equal(x, y), name
    with torch.no_grad():
        kw = dict(topk_weights=inp["topk_weights"], topk_ids=ids)
        c = fused_moe(inp["hidden"], inp["gate_up_proj"], inp["down_proj"], **kw)
        d = fused_moe(inp["hidden"], inp["gate_up_proj"], inp["down_proj"], **kw)
    assert torch.equal(c, d)


# ---------------------------------------------------------------- bad inputs

def _small(T=6, E=4, k=2, H=8, I=5, dtype=F32):
    g = _gen(21)
    x = torch.randn(T, H, generator=g).to(dtype)
    w1, w2 = _experts(E, H, I, dtype, g)
    tw = torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    return x, w1, w2, tw, ids


@pytest.mark.parametrize("bad", [4, 100, -1, -7])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_ids_out_of_range_raise(bad, id_dtype):
    x, w1, w2, tw, ids = _small()
    ids = ids.to(id_dtype)
    ids[3, 1] = bad
    with pytest.raises(RuntimeError, match="topk_ids"):
        fused_moe(x, w1, w2, topk_weights=tw, topk_ids=ids)
    with pytest.raises(RuntimeError, match="topk_ids"):
        fused_moe(x.requires_grad_(), w1, w2, topk_weights=tw, topk_ids=ids)
    with pytest.raises(RuntimeError, match="topk_ids"):
        torch.ops.accel.fused_moe_fwd(x, w1, w2, tw, ids, "silu", False)


def test_backward_op_checks_ids():
    x, w1, w2, tw, ids = _small()
    out, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, tw, ids, "silu", True)
    bad = ids.clone()
    bad[0, 0] = 4
    with pytest.raises(RuntimeError, match="topk_ids"):
        torch.ops.accel.fused_moe_bwd(torch.ones_like(out), x, w1, w2, tw, bad, cache, "silu", [True] * 4)
    with pytest.raises(ValueError, match="cache must be the forward"):
        torch.ops.accel.fused_moe_bwd(torch.ones_like(out), x, w1, w2, tw, ids, cache[:, :-1], "silu", [True] * 4)


def test_top_k_larger_than_experts_raises():
    x, w1, w2, tw, ids = _small(E=4, k=2)
    wide = torch.tensor([[0, 1, 2, 3, 0]] * 6)
    with pytest.raises(ValueError, match=r"top-k must be in \[1, E\]"):
        fused_moe(x, w1, w2, topk_weights=torch.rand(6, 5), topk_ids=wide)
    logits = torch.randn(6, 4)
    for k in (0, 5):
        with pytest.raises(ValueError, match="top_k"):
            fused_moe(x, w1, w2, router_logits=logits, top_k=k)
        with pytest.raises(ValueError, match="top_k"):
            moe_route(logits, k)
        with pytest.raises(ValueError, match=r"top_k must be in \[1, E\] = \[1, 4\]"):
            torch.ops.accel.moe_route(logits, k, True, "softmax")
    with pytest.raises(ValueError, match="top-k"):  # k = 0 columns
        fused_moe(x, w1, w2, topk_weights=torch.rand(6, 0), topk_ids=torch.zeros(6, 0, dtype=torch.int64))


@pytest.mark.parametrize("what", [
    "gate_up_rows", "gate_up_hidden", "down_experts", "down_hidden", "ids_tokens", "weights_vs_ids",
])
def test_shape_mismatches_raise(what):
    x, w1, w2, tw, ids = _small()
    msg = {"gate_up_rows": "gate_up_proj must have shape", "gate_up_hidden": "gate_up_proj must have shape",
           "down_experts": "down_proj must have shape", "down_hidden": "down_proj must have shape",
           "ids_tokens": "topk_ids must have shape", "weights_vs_ids": "same shape"}[what]
    if what == "gate_up_rows":
        w1 = torch.randn(4, 11, 8)
    elif what == "gate_up_hidden":
        w1 = torch.randn(4, 10, 9)
    elif what == "down_experts":
        w2 = torch.randn(5, 8, 5)
    elif what == "down_hidden":
        w2 = torch.randn(4, 7, 5)
    elif what == "ids_tokens":
        ids, tw = torch.cat([ids, ids[:1]]), torch.cat([tw, tw[:1]])
    else:
        tw = tw[:, :1]
    with pytest.raises(ValueError, match=msg):
        fused_moe(x, w1, w2, topk_weights=tw, topk_ids=ids)


def test_wrong_ranks_raise_value_errors():
    x, w1, w2, tw, ids = _small()
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        fused_moe(x[None], w1, w2, topk_weights=tw, topk_ids=ids)
    with pytest.raises(ValueError, match="gate_up_proj must be 3-D"):
        fused_moe(x, w1[0], w2, topk_weights=tw, topk_ids=ids)
    with pytest.raises(ValueError, match="down_proj must be 3-D"):
        fused_moe(x, w1, w2[None], topk_weights=tw, topk_ids=ids)
    with pytest.raises(ValueError, match="topk_ids must be 2-D"):
        fused_moe(x, w1, w2, topk_weights=tw, topk_ids=ids.flatten())
    with pytest.raises(ValueError, match="router_logits must be 2-D"):
        fused_moe(x, w1, w2, router_logits=torch.randn(6))
    with pytest.raises(TypeError, match="hidden must be a tensor"):
        fused_moe(x.tolist(), w1, w2, topk_weights=tw, topk_ids=ids)


def test_router_logits_with_the_wrong_number_of_experts_raise():
    x, w1, w2, tw, ids = _small(E=4)
    for cols in (3, 5):  # fewer experts would silently ignore the last ones; more would route off the end
        logits = torch.randn(6, cols)
        logits[:, -1] = 10.0
        with pytest.raises((ValueError, RuntimeError), match="router_logits|topk_ids"):
            fused_moe(x, w1, w2, router_logits=logits)
    with pytest.raises((ValueError, RuntimeError), match="router_logits|topk_ids"):
        fused_moe(x, w1, w2, router_logits=torch.randn(7, 4))


def test_dtype_mismatches_raise():
    x, w1, w2, tw, ids = _small()
    with pytest.raises(TypeError, match="gate_up_proj has dtype Double but hidden has dtype Float"):
        fused_moe(x, w1.double(), w2, topk_weights=tw, topk_ids=ids)
    with pytest.raises(TypeError, match="down_proj has dtype"):
        fused_moe(x, w1, w2.bfloat16(), topk_weights=tw, topk_ids=ids)
    with pytest.raises(TypeError, match="topk_weights must be float32 or the hidden dtype"):
        fused_moe(x, w1, w2, topk_weights=tw.double(), topk_ids=ids)
    with pytest.raises(TypeError, match="topk_weights must be float32 or the hidden dtype"):
        fused_moe(x.bfloat16(), w1.bfloat16(), w2.bfloat16(), topk_weights=tw.half(), topk_ids=ids)
    for bad in (ids.float(), ids.to(torch.int16), ids.to(torch.uint8)):
        with pytest.raises(TypeError, match="topk_ids must be int64 or int32"):
            fused_moe(x, w1, w2, topk_weights=tw, topk_ids=bad)
    with pytest.raises(TypeError, match="floating-point"):
        fused_moe(x.int(), w1.int(), w2.int(), topk_weights=tw, topk_ids=ids)
    with pytest.raises(TypeError, match="floating-point"):
        moe_route(torch.randint(0, 3, (6, 4)), 2)


def test_device_mismatch_raises():
    x, w1, w2, tw, ids = _small()
    # the CPU kernel's own check (called directly: with a meta tensor among the arguments the dispatcher
    # would pick the meta implementation)
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(ValueError, match="gate_up_proj is on meta but hidden is on cpu"):
        torch.ops.accel.fused_moe_fwd.default.redispatch(cpu, x, w1.to("meta"), w2, tw, ids, "silu", False)
    with pytest.raises(ValueError, match="topk_ids is on meta"):
        torch.ops.accel.fused_moe_fwd.default.redispatch(cpu, x, w1, w2, tw, ids.to("meta"), "silu", False)
    # through the public API: weights left on the meta device (a model not materialised) must not give
    # an uninitialised CPU result
    with pytest.raises(ValueError, match="gate_up_proj is on meta but hidden is on cpu"):
        fused_moe(x, w1.to("meta"), w2.to("meta"), topk_weights=tw, topk_ids=ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for a CPU/CUDA mix")
def test_cpu_cuda_mismatch_raises():
    x, w1, w2, tw, ids = _small()
    with pytest.raises((RuntimeError, ValueError), match="device"):
        fused_moe(x, w1.cuda(), w2.cuda(), topk_weights=tw.cuda(), topk_ids=ids.cuda())
    with pytest.raises((RuntimeError, ValueError), match="device"):
        fused_moe(x.cuda(), w1.cuda(), w2.cuda(), topk_weights=tw, topk_ids=ids.cuda())


def test_bad_names_and_argument_combinations_raise():
    x, w1, w2, tw, ids = _small()
    logits = torch.randn(6, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        fused_moe(x, w1, w2, router_logits=logits, activation="swish")
    with pytest.raises(ValueError, match="scoring"):
        fused_moe(x, w1, w2, router_logits=logits, scoring="softplus")
    with pytest.raises(ValueError, match="scoring"):
        moe_route(logits, 2, scoring="Softmax")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.accel.fused_moe_fwd(x, w1, w2, tw, ids, "swish", False)
    with pytest.raises(ValueError, match="scoring must be 'softmax' or 'sigmoid'"):
        torch.ops.accel.moe_route(logits, 2, True, "softplus")
    with pytest.raises(ValueError, match="not both"):
        fused_moe(x, w1, w2, router_logits=logits, topk_weights=tw, topk_ids=ids)
    with pytest.raises(ValueError, match="both topk_weights and topk_ids"):
        fused_moe(x, w1, w2, topk_weights=tw)
    with pytest.raises(ValueError, match="router_logits"):
        fused_moe(x, w1, w2)


def test_backward_without_saved_activations_raises():
    x, w1, w2, tw, ids = _small()
    x.requires_grad_()
    out, _ = torch.ops.accel.fused_moe_fwd(x, w1, w2, tw, ids, "silu", False)
    with pytest.raises(RuntimeError, match="save_cache"):
        out.sum().backward()


# ---------------------------------------------------------------- torch integration

def test_torch_compile_fullgraph_forward_and_backward():
    g = _gen(17)
    T, E, H, I = 19, 6, 24, 20
    x = torch.randn(T, H, generator=g)
    w1, w2 = _experts(E, H, I, F32, g)
    logits = torch.randn(T, E, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(T)]).int()
    tw = torch.rand(T, 3, generator=g)

    def f(x, w1, w2, logits, tw):
        a = fused_moe(x, w1, w2, router_logits=logits, top_k=2, scoring="sigmoid")
        b = fused_moe(x, w1, w2, topk_weights=tw, topk_ids=ids, activation="gelu")
        return a.square().sum() + (a * b).sum()

    cf = torch.compile(f, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (x, w1, w2, logits, tw)]
    args2 = [t.clone().requires_grad_() for t in (x, w1, w2, logits, tw)]
    y, y2 = cf(*args), f(*args2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    y.backward()
    y2.backward()
    for a, b in zip(args, args2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w1, w2, tw, ids = _small(T=7, E=5, k=3, H=6, I=4)
    grad = lambda t: t.clone().requires_grad_()  # noqa: E731
    logits = torch.randn(7, 5)
    for sample in [
        (grad(logits), 2, True, "softmax"),
        (grad(logits), 5, False, "sigmoid"),
        (logits.bfloat16(), 1, True, "sigmoid"),
        (grad(logits.double()), 3, True, "softmax"),  # fp64 logits: fp64 weights
        (torch.randn(0, 5), 3, True, "softmax"),
    ]:
        torch.library.opcheck(torch.ops.accel.moe_route, sample)
    for lg, renorm, scoring in ((logits, True, "softmax"), (logits, False, "sigmoid"),
                                (logits.double(), True, "sigmoid")):
        w, i = moe_route(lg, 3, renormalize=renorm, scoring=scoring)
        torch.library.opcheck(torch.ops.accel.moe_route_backward,
                              (torch.randn(7, 3, dtype=w.dtype), lg, w, i, renorm, scoring))
    for sample in [
        (grad(x), grad(w1), grad(w2), grad(tw), ids, "silu", True),
        (grad(x), w1, grad(w2), tw, ids.int(), "gelu", True),
        (x, w1, w2, tw, ids, "relu", False),
        (x.bfloat16(), w1.bfloat16(), w2.bfloat16(), tw.bfloat16(), ids.int(), "none", True),
        (x[:0], w1, w2, tw[:0], ids[:0], "silu", True),
    ]:
        torch.library.opcheck(torch.ops.accel.fused_moe_fwd, sample)
    _, cache = torch.ops.accel.fused_moe_fwd(x, w1, w2, tw, ids, "silu", True)
    go = torch.randn_like(x)
    for mask in ([True] * 4, [True, False, True, False], [False, False, False, True]):
        torch.library.opcheck(torch.ops.accel.fused_moe_bwd, (go, x, w1, w2, tw, ids, cache, "silu", mask))


def test_info_lists_the_op():
    assert accel.info(print_it=False)["kernels"]["fused_moe"]["cpu"] is True
