"""One-line patching demo: ``python -m accel.demo [--quick] [--model tcn|attention|moe|both|all]``.

Three small language models:

* ``tcn``: a causal TCN out of ``nn.Conv1d`` layers (each block: depthwise causal dilated conv
  written the usual way, ``padding=(K-1)*d`` then chomp, + GELU + pointwise 1x1 conv, residual);
* ``attention``: a pre-norm transformer whose attention is the eager sigmoid attention module
  ``accel.reference.SigmoidMultiheadAttention`` (causal), with GELU MLPs;
* ``moe``: a transformers mixture-of-experts causal LM (Mixtral-shaped) with random weights built
  from a config (needs transformers and an installed plugin with a rule for its sparse MoE blocks,
  found through the ``accel.plugins`` entry points like ``accel.patch`` finds it; skipped with a
  message otherwise), whose sparse MoE blocks ``accel.patch`` replaces by ``accel.nn.FusedMoE``.

``both`` is tcn and attention (plain PyTorch only); ``all`` (the default) adds moe.

For each: run it, call ``accel.patch(model)``, check the output and gradients did not change,
time the original against the patched model (interleaved medians, forward and
forward+backward), then ``accel.unpatch(model)`` and check the original modules are back.

Exits non-zero if a patched output differs by more than 1e-5 of the output's scale, if the
gradients differ by more than 1e-4 of their scale, if nothing was patched, or if unpatch does not
restore the original modules.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import List, Optional

import torch
from torch import nn

import accel
from accel import reference
from accel.bench.harness import time_interleaved
from accel.patching import list_plugins
from accel.patching.plugins import plugin_rules

OUT_TOL = 1e-5  # max |patched - original| / max |original|, forward output
GRAD_TOL = 1e-4  # the same for every parameter's gradient


class CausalBlock(nn.Module):
    """Depthwise causal dilated conv (pad both sides, chomp the right) + GELU + 1x1 conv, residual."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.dwconv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels,
                                padding=(kernel_size - 1) * dilation)
        self.act = nn.GELU()
        self.pwconv = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        h = self.dwconv(x)[..., : x.shape[-1]]  # chomp: keep the causal part
        return x + self.pwconv(self.act(h))


class TCNLanguageModel(nn.Module):
    """Byte-level causal TCN: embedding -> ``blocks`` CausalBlocks (dilation 2**i) -> 1x1 head."""

    def __init__(self, vocab: int = 256, channels: int = 256, blocks: int = 8, kernel_size: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, channels)
        self.blocks = nn.Sequential(*[CausalBlock(channels, kernel_size, 2**i) for i in range(blocks)])
        self.head = nn.Conv1d(channels, vocab, 1)

    def forward(self, tokens):  # (B, L) int64 -> (B, vocab, L) logits
        x = self.embed(tokens).transpose(1, 2).contiguous()
        return self.head(self.blocks(x))


class SigmoidBlock(nn.Module):
    """Pre-norm transformer block: causal eager sigmoid attention + GELU MLP, residuals."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = reference.SigmoidMultiheadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, is_causal=True)
        return x + self.mlp(self.norm2(x))


class SigmoidTransformerLM(nn.Module):
    """Byte-level causal transformer with sigmoid attention: embedding -> blocks -> norm -> head."""

    def __init__(self, vocab: int = 256, dim: int = 256, heads: int = 4, layers: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[SigmoidBlock(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):  # (B, L) int64 -> (B, L, vocab) logits
        return self.head(self.norm(self.blocks(self.embed(tokens))))


class HFLogits(nn.Module):
    """A transformers causal LM as ``tokens -> logits`` (the demo's calling convention)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, tokens):  # (B, L) int64 -> (B, L, vocab) logits
        return self.lm(input_ids=tokens, use_cache=False).logits


def _moe_plugin_missing() -> Optional[str]:
    """Why no loaded plugin patches the fused MoE op (discovered through the entry points), or None."""
    statuses = list_plugins()
    if any(rule.op == "fused_moe" for rule in plugin_rules(statuses)):
        return None
    seen = "; ".join(str(s) for s in statuses) or "no accel plugin is installed"
    return f"no loaded accel plugin patches fused_moe ({seen})"


def build_mixtral(hidden: int, layers: int) -> Optional[nn.Module]:
    """A random-weight Mixtral LM (8 experts, top-2, eager experts), or None without transformers/the plugin."""
    try:
        from transformers import MixtralConfig, MixtralForCausalLM
    except ImportError as e:
        reason = str(e)
    else:
        reason = _moe_plugin_missing()
    if reason is not None:
        print(f"\n== Mixtral MoE: skipped ({reason}); bash scripts/setup.sh installs transformers and the plugin")
        return None
    cfg = MixtralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                        num_key_value_heads=max(1, hidden // 128), num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "eager"
    return HFLogits(MixtralForCausalLM(cfg).eval())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = a.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def _grads(model: nn.Module, tokens, grad_out) -> dict:
    model.zero_grad(set_to_none=True)
    model(tokens).backward(grad_out)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m accel.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small model and sequence (a few seconds)")
    p.add_argument("--channels", type=int, default=None, help="channels (default 256; quick 64)")
    p.add_argument("--length", type=int, default=None, help="sequence length (default 16384; quick 2048)")
    p.add_argument("--blocks", type=int, default=None, help="residual blocks (default 8; quick 4)")
    p.add_argument("--kernel-size", type=int, default=3)
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 3)")
    p.add_argument("--no-timing", action="store_true", help="only the correctness and unpatch checks")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--model", choices=("tcn", "attention", "moe", "both", "all"), default="all",
                   help="which model(s): both = tcn + attention, all (default) adds moe")
    p.add_argument("--attn-dim", type=int, default=None, help="transformer width (default 256; quick 64)")
    p.add_argument("--attn-heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--attn-layers", type=int, default=None, help="transformer blocks (default 4; quick 2)")
    p.add_argument("--attn-length", type=int, default=None, help="transformer input length (default 2048; quick 512)")
    p.add_argument("--moe-hidden", type=int, default=None, help="Mixtral hidden size (default 512; quick 64)")
    p.add_argument("--moe-layers", type=int, default=None, help="Mixtral layers (default 2; quick 1)")
    p.add_argument("--moe-length", type=int, default=None, help="Mixtral input length (default 512; quick 64)")
    args = p.parse_args(argv)
    args.channels = args.channels or (64 if args.quick else 256)
    args.length = args.length or (2048 if args.quick else 16384)
    args.blocks = args.blocks or (4 if args.quick else 8)
    args.reps = args.reps or (3 if args.quick else 5)
    args.attn_dim = args.attn_dim or (64 if args.quick else 256)
    args.attn_layers = args.attn_layers or (2 if args.quick else 4)
    args.attn_length = args.attn_length or (512 if args.quick else 2048)
    args.moe_hidden = args.moe_hidden or (64 if args.quick else 512)
    args.moe_layers = args.moe_layers or (1 if args.quick else 2)
    args.moe_length = args.moe_length or (64 if args.quick else 512)
    return args


def run(args) -> dict:
    """Run the demo; return ``{"ok": bool, "models": {name: result}}`` (see :func:`run_model`)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    if args.model in ("tcn", "both", "all"):
        torch.manual_seed(0)
        model = TCNLanguageModel(channels=args.channels, blocks=args.blocks, kernel_size=args.kernel_size)
        tokens = torch.randint(0, 256, (1, args.length))
        results["tcn"] = run_model("TCN language model", model, tokens, torch.randn(1, 256, args.length), args)
    if args.model in ("attention", "both", "all"):
        torch.manual_seed(0)
        model = SigmoidTransformerLM(dim=args.attn_dim, heads=args.attn_heads, layers=args.attn_layers)
        tokens = torch.randint(0, 256, (1, args.attn_length))
        results["attention"] = run_model("sigmoid-attention transformer", model, tokens,
                                         torch.randn(1, args.attn_length, 256), args)
    if args.model in ("moe", "all"):
        torch.manual_seed(0)
        model = build_mixtral(args.moe_hidden, args.moe_layers)
        if model is not None:
            tokens = torch.randint(0, 256, (1, args.moe_length))
            results["moe"] = run_model("Mixtral MoE (transformers, eager experts)", model, tokens,
                                       torch.randn(1, args.moe_length, 256), args)
    ok = all(r["ok"] for r in results.values())
    if len(results) > 1:
        print("\n== summary")
        for name, r in results.items():
            t = "  ".join(f"{k} {v['speedup']:.2f}x" for k, v in r["timings"].items())
            print(f"{name:<10} {'OK' if r['ok'] else 'FAILED'}  replaced {r['replaced']}  {t}")
    print("\n" + ("demo OK" if ok else "demo FAILED"))
    return {"ok": ok, "models": results}


def run_model(title: str, model: nn.Module, tokens: torch.Tensor, grad_out: torch.Tensor, args) -> dict:
    """Patch one model; return the checks' outcomes (``ok``), the report's counts and the timings."""
    with torch.no_grad():
        shape = tuple(model(tokens[:, :8]).shape[:1]) + tuple(grad_out.shape[1:])
    print(f"\n== {title}")
    print(model)
    print(f"\ninput: tokens {tuple(tokens.shape)}; output: logits {shape}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        y_ref = model(tokens)
    grads_ref = _grads(model, tokens, grad_out)
    original = copy.deepcopy(model)  # kept unpatched, to time side by side
    before = dict(model.named_modules())

    report = accel.patch(model)
    print()
    print(report)
    failures: List[str] = []
    n_replaced = len(report.replaced)
    if n_replaced == 0:
        failures.append("accel.patch replaced nothing")

    with torch.no_grad():
        y = model(tokens)
    out_rel = _rel(y_ref, y)
    grads = _grads(model, tokens, grad_out)
    grad_rel = max((_rel(grads_ref[n], grads[n]) for n in grads_ref), default=0.0)
    if set(grads) != set(grads_ref):
        failures.append("patched model has a different set of gradients")
    print(f"\ncheck: max |patched - original| / max |original| = {out_rel:.2e} (output, tol {OUT_TOL:g}), "
          f"{grad_rel:.2e} (worst parameter gradient, tol {GRAD_TOL:g})")
    if not out_rel <= OUT_TOL:
        failures.append(f"patched output differs: {out_rel:.2e} > {OUT_TOL:g}")
    if not grad_rel <= GRAD_TOL:
        failures.append(f"patched gradients differ: {grad_rel:.2e} > {GRAD_TOL:g}")

    timings = {}
    if not args.no_timing:
        model.zero_grad(set_to_none=True)
        original.zero_grad(set_to_none=True)

        def fwd(m):
            def f():
                with torch.no_grad():
                    return m(tokens)
            return f

        def fwd_bwd(m):
            def f():
                m.zero_grad(set_to_none=True)
                m(tokens).backward(grad_out)
            return f

        print(f"\ntiming: original and patched interleaved, median of {args.reps} rounds after a warm-up")
        print(f"{'':<10} {'original ms':>12} {'patched ms':>11} {'speed-up':>9}")
        for label, make in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
            times, _ = time_interleaved({"original": make(original), "patched": make(model)},
                                        warmup=1, min_reps=args.reps, max_reps=args.reps)
            o = statistics.median(times["original"]) * 1e3
            p = statistics.median(times["patched"]) * 1e3
            timings[label] = {"original_ms": o, "patched_ms": p, "speedup": o / p}
            print(f"{label:<10} {o:>12.1f} {p:>11.1f} {o / p:>8.2f}x", flush=True)
        model.zero_grad(set_to_none=True)

    undone = accel.unpatch(model)
    after = dict(model.named_modules())
    restored = set(after) == set(before) and all(after[k] is before[k] for k in before)
    with torch.no_grad():
        y_back = model(tokens)
    same = torch.equal(y_back, y_ref)
    print(f"\naccel.unpatch(model): {undone} change(s) undone; original module objects back: {restored}; "
          f"output identical to the unpatched run: {same}")
    if not restored:
        failures.append("unpatch did not restore the original modules")
    if not same:
        failures.append("output after unpatch differs from the original")

    ok = not failures
    print("\n" + (f"{title}: OK" if ok else f"{title}: FAILED: " + "; ".join(failures)))
    return {"ok": ok, "failures": failures, "replaced": n_replaced, "output_rel_diff": out_rel,
            "grad_rel_diff": grad_rel, "timings": timings, "restored": restored}


def main(argv: Optional[list] = None) -> int:
    return 0 if run(parse_args(argv))["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
