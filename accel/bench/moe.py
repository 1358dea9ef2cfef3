"""Fused MoE benchmark cases (``python -m accel.bench moe``).

``accel.ops.fused_moe(hidden, gate_up_proj, down_proj, topk_weights=w, topk_ids=ids)`` against
transformers' experts implementations on a Mixtral-shaped expert block (H 1024, I 2816, E 8, top-2):
``MixtralExperts`` with ``config._experts_implementation`` set to

* ``eager``: the per-expert Python loop (gather the expert's tokens, two ``F.linear``, ``index_add_``);
* ``batched_mm``: one ``bmm`` per projection over a gathered weight copy per (token, slot);
* ``grouped_mm``: tokens sorted by expert, ``torch.nn.functional.grouped_mm`` (or transformers'
  fallback loop where that is unavailable).

Every implementation gets the same weights and the same routing: the top-k of the softmax of a
fixed random router (``x @ router.T``, computed in float32), renormalised as Mixtral's router does,
float32 weights and int64 ids as transformers passes them. Modes: ``fwd`` (no grad) and ``fwd+bwd``
(gradients of hidden, both weight tensors and topk_weights from a fixed ``grad_output``); the
outputs/gradients of accel are checked against eager's.

Bandwidth: decode is bound by reading the routed experts' weights. Forward cases report accel's
GB/s over the bytes of the distinct experts the ids route to (``3 I H`` elements each) as a
fraction of the machine's read bandwidth: that of a read-only reduction over as many bytes, timed in
the same rounds (median against median; against its fastest round too), and, for reference, the
once-per-run measurement over 512 MiB (:func:`accel.bench.timing.read_bandwidth`), which drift in
the machine's bandwidth can leave far from the case's conditions.
So that a call does not find its weights in the last-level cache where the previous call (of any
implementation) left them, forward cases whose routed weights are small cycle through a few
copies of the expert weights, one per call, as successive layers of a model would: independent
random draws (every implementation's first call, whose output the check compares, runs on the
first copy).

batched_mm gathers a ``(2I x H)`` and an ``(H x I)`` weight copy per (token, slot) (tens of GB at
T 512 in fp32): it is skipped, with a note, where its estimated memory exceeds a cap (CPU: min(8 GiB,
a third of RAM); CUDA: a third of the device memory), and in the quick preset beyond a few pairs.
"""
from __future__ import annotations

import inspect
import math
from typing import Dict, List, Tuple

import torch
from torch import nn

from accel.bench.case import READ_BW, Case, Setup, backward_setup, element_size, no_grad_setup, tolerance
from accel.bench.memory import mem_total_bytes

GiB = 1024 ** 3

# (H, I, E, top-k) per preset: Mixtral-shaped, and a tiny one for the CLI test
SHAPES = {"full": (1024, 2816, 8, 2), "quick": (1024, 2816, 8, 2), "tiny": (64, 96, 4, 2)}
CPU_T = {"full": (1, 4, 64, 512, 2048), "quick": (1, 64, 512), "tiny": (1, 5, 40)}
GPU_T = {"full": (1, 8, 64, 512, 2048, 8192), "quick": (1, 64, 512), "tiny": (1, 40)}
QUICK_MAX_T_BWD_CPU = 64  # quick preset: fwd+bwd on CPU only up to this T (T 512 takes seconds per call)
PEERS = ("eager", "batched_mm", "grouped_mm")
FALLBACK_PEER = "reference loop"  # when transformers is not installed
# quick preset: batched_mm only up to this many (token, slot) pairs (it takes seconds beyond)
QUICK_BATCHED_MM_PAIRS = 16
# forward cases cycle weight copies until the routed bytes of one cycle reach this (cold caches)
COLD_BYTES = {"cpu": 256 * 1024 ** 2, "cuda": 512 * 1024 ** 2}
MAX_COPIES = 8
READ_ROW = 16384  # floats per row of the read yardstick's row-wise amax
COPIES_MEMORY = {"cpu": 2 * GiB, "cuda": 8 * GiB}  # at most this much memory in weight copies
LOW_PRECISION_TOL = 5e-2  # eager rounds every intermediate (and its index_add_ accumulation) to bf16


def have_transformers() -> bool:
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: F401
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- routing, memory

def routing(T: int, H: int, E: int, k: int, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden fp32 (T, H), topk_weights fp32 (T, k), topk_ids int64 (T, k))``, as Mixtral routes:
    softmax over a fixed random router's float32 logits, top-k, renormalised to sum to 1."""
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(E, H, generator=g) / math.sqrt(H)
    x = torch.randn(T, H, generator=g)
    probs = torch.softmax(x @ router.t(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return x, w, ids


def routed_experts(T: int, H: int, E: int, k: int, seed: int = 0) -> int:
    """How many distinct experts the case's routing sends tokens to."""
    return int(routing(T, H, E, k, seed)[2].unique().numel())


def batched_mm_bytes(T: int, H: int, I: int, k: int, elem: int, mode: str) -> int:
    """batched_mm's gathered weight copies: (2I x H) + (H x I) per (token, slot); backward keeps them
    (bmm saves its inputs) and adds their gradients."""
    fwd = T * k * 3 * I * H * elem
    return fwd if mode == "fwd" else 2 * fwd


def memory_cap(device: str) -> int:
    """The largest estimated footprint a peer may have before it is skipped."""
    if device.startswith("cuda"):
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory // 3
        return 80 * GiB // 3  # listing GPU cases on a machine without one: assume an 80 GB GPU
    total = mem_total_bytes()
    return min(8 * GiB, total // 3) if total else 8 * GiB


def weight_copies(touched_bytes: int, all_bytes: int, device: str, mode: str) -> int:
    """Copies of the expert weights a forward case cycles through, one per call (cold caches)."""
    if mode != "fwd" or touched_bytes <= 0:
        return 1
    key = "cuda" if device.startswith("cuda") else "cpu"
    want = math.ceil(COLD_BYTES[key] / touched_bytes)
    fit = max(1, COPIES_MEMORY[key] // max(all_bytes, 1))
    return int(max(1, min(want, MAX_COPIES, fit)))


# --------------------------------------------------------------------------- builder

def _experts_module(impl: str, w1: nn.Parameter, w2: nn.Parameter, k: int) -> nn.Module:
    """transformers' MixtralExperts running ``impl``, holding the given parameters (no copy)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, I2, H = w1.shape
    cfg = MixtralConfig(hidden_size=H, intermediate_size=I2 // 2, num_local_experts=E, num_experts_per_tok=k)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        m = MixtralExperts(cfg)
    m.gate_up_proj = w1
    m.down_proj = w2
    return m


def read_ref_bytes(touched_bytes: int) -> int:
    """Bytes the read yardstick reduces: the routed weights' bytes, down to whole rows of READ_ROW floats."""
    return touched_bytes // (4 * READ_ROW) * (4 * READ_ROW)


def build_moe(*, T: int, H: int, I: int, E: int, k: int, mode: str, device: str, dtype: str,
              peers: Tuple[str, ...] = PEERS, copies: int = 1, seed: int = 0, read_bytes: int = 0) -> Setup:
    from accel.ops.fused_moe import fused_moe

    # the ids come from a top-k over the E experts: no host-side range check (a device sync on CUDA)
    accel_kw = {"check_ids": False} if "check_ids" in inspect.signature(fused_moe).parameters else {}

    dt = getattr(torch, dtype)
    x, w, ids = routing(T, H, E, k, seed)
    x = x.to(device=device, dtype=dt)
    w, ids = w.to(device), ids.to(device)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    grad = mode != "fwd"

    def draw():
        return ((torch.randn(E, 2 * I, H, generator=g, device=device) / math.sqrt(H)).to(dt),
                (torch.randn(E, H, I, generator=g, device=device) / math.sqrt(I)).to(dt))

    # the copies are independent draws, as a model's successive layers are: every call reads weights
    # no recent call has read. Clones (copies of the same values) are avoided: identical pages can be
    # shared below a virtual machine and read slower, which a model's layers would not see.
    layers = [tuple(nn.Parameter(t, requires_grad=grad) for t in draw()) for _ in range(copies)]
    mods: Dict[str, list] = {}
    for p in peers:
        if p != FALLBACK_PEER:
            mods[p] = [_experts_module(p, a, b, k) for a, b in layers]
    # every implementation's first call (the warm-up output the check compares) runs on copy 0; the
    # calls after it take the copies in turn, shared by all implementations, starting after copy 0
    counter = [1 % len(layers)]
    started = set()

    def next_layer(name: str) -> int:
        if name not in started:
            started.add(name)
            return 0
        i = counter[0]
        counter[0] = (i + 1) % len(layers)
        return i

    def accel_fn():
        a, b = layers[next_layer("accel")]
        return fused_moe(x, a, b, topk_weights=w, topk_ids=ids, **accel_kw)

    def peer_fn(name):
        if name == FALLBACK_PEER:
            from accel.reference import fused_moe as loop

            def run():
                a, b = layers[next_layer(name)]
                return loop(x, a, b, topk_weights=w, topk_ids=ids)
            return run

        def run():
            return mods[name][next_layer(name)](x, ids, w)
        return run

    fns = {"accel": accel_fn}
    fns.update({p: peer_fn(p) for p in peers})
    if mode == "fwd":
        if read_bytes:
            # the read yardstick: a read-only reduction (row amax, fp32) over as many bytes as accel
            # must read, cycling through as many buffers as there are weight copies (so that it reads
            # memory no call of the previous round read either), timed in the same rounds
            # (random values, like the weights: not pages of one repeated value)
            bufs = [torch.rand(read_bytes // (4 * READ_ROW), READ_ROW, generator=g, device=device)
                    for _ in range(copies)]
            at = [0]

            def read_fn():
                b = bufs[at[0]]
                at[0] = (at[0] + 1) % len(bufs)
                return b.amax(1)
            fns[READ_BW] = read_fn
        return no_grad_setup(fns)

    a, b = layers[0]
    leaves = (x, a, b, w)
    gy = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 2)).to(device=device, dtype=dt)
    return backward_setup(fns, leaves, gy)


# --------------------------------------------------------------------------- cases

def cases(args) -> List[Case]:
    size, device, dtype = args.size, args.device, args.dtype
    cuda = device.startswith("cuda")
    H, I, E, k = SHAPES[size]
    Ts = (GPU_T if cuda else CPU_T)[size]
    elem = element_size(dtype)
    expert_bytes = 3 * I * H * elem
    cap = memory_cap(device)
    tf = have_transformers()
    all_peers = PEERS if tf else (FALLBACK_PEER,)
    group = f"fused MoE vs transformers experts, {device} {dtype}, H{H} I{I} E{E} top-{k}"
    base_note = ("peers: transformers' MixtralExperts with config._experts_implementation = eager | batched_mm | "
                 "grouped_mm; same weights, same routing (Mixtral: softmax top-k of a fixed random router, "
                 "renormalised; float32 weights); fwd+bwd: gradients of hidden, both weights and topk_weights; "
                 "check: accel vs eager" if tf else
                 "transformers is not installed: its experts implementations are unavailable, accel's reference "
                 "per-expert loop (the same algorithm as transformers' eager experts) stands in")
    base_note += ("; accel GB/s (fwd) = bytes of the routed experts' weights (3 I H elements per distinct expert "
                  "in the ids) / median time, % = of the machine's read bandwidth (see the header); forward cases "
                  "with few routed bytes cycle weight copies (independent random draws), one per call, so that no "
                  "call finds its weights in cache")
    out: List[Case] = []
    for mode in ("fwd", "fwd+bwd"):
        for T in Ts:
            if mode != "fwd" and size == "quick" and not cuda and T > QUICK_MAX_T_BWD_CPU:
                continue
            n = routed_experts(T, H, E, k)
            notes = []
            peers = list(all_peers)
            if "batched_mm" in peers:
                est = batched_mm_bytes(T, H, I, k, elem, mode)
                if est > cap:
                    peers.remove("batched_mm")
                    notes.append(f"batched_mm skipped: it gathers a weight copy per (token, slot), "
                                 f"~{est / GiB:.1f} GiB > the cap {cap / GiB:.1f} GiB")
                elif size == "quick" and T * k > QUICK_BATCHED_MM_PAIRS:
                    peers.remove("batched_mm")
                    notes.append(f"batched_mm skipped in the quick preset beyond {QUICK_BATCHED_MM_PAIRS} "
                                 f"(token, slot) pairs (seconds per call)")
            copies = weight_copies(n * expert_bytes, E * expert_bytes, device, mode)
            if copies > 1:
                notes.append(f"{copies} weight copies cycled")
            rbytes = read_ref_bytes(n * expert_bytes) if mode == "fwd" else 0
            params = dict(T=T, H=H, I=I, E=E, k=k, mode=mode, device=device, dtype=dtype, peers=tuple(peers),
                          copies=copies, read_bytes=rbytes)
            check = ("eager",) if "eager" in peers else ((FALLBACK_PEER,) if FALLBACK_PEER in peers else ())
            out.append(Case(
                op="moe", group=group, name=f"T{T} ({n}/{E} experts)", mode=mode, builder=build_moe,
                params=params, peers=tuple(peers), check=check, tol=tolerance(dtype, mode, low_precision=LOW_PRECISION_TOL),
                aux=(READ_BW,) if rbytes else (), bw_bytes=n * expert_bytes if mode == "fwd" else None,
                bw_ref=READ_BW if mode == "fwd" else None, bw_ref_bytes=rbytes or None,
                warm_params=dict(params, T=min(T, 4), copies=1, read_bytes=0),
                note="; ".join(([] if out else [base_note]) + notes),
            ))
    return out
