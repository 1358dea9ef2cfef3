"""Small launches of every CUDA kernel, meant to run under ``compute-sanitizer`` (memcheck).

Every op's capability record lists examples on odd shapes (odd head dims, ragged lengths, GQA,
options on) and, for the sanitizer, larger edge cases (every head-dim bucket, multi-tile lengths,
empty inputs, a full cache); each runs forward and backward in every CUDA dtype the record declares, so
out-of-bounds reads or writes and misaligned accesses show up in the sanitizer's report. Run from
the repository root after a CUDA build:

    compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/gpu_sanitize.py [op ...]
"""
from __future__ import annotations

import sys

import torch

from accel.ops import capabilities

DEV = torch.device("cuda")


def run(name: str) -> None:
    cap = capabilities()[name]
    for dtype in cap.dtypes.get("cuda", ()):
        extra = cap.sanitize_examples(DEV, dtype) if cap.sanitize_examples else []
        for example in cap.examples(DEV, dtype) + extra:
            out = example()
            outs = out if isinstance(out, tuple) else (out,)
            grads = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
            if grads:
                torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])


if __name__ == "__main__":
    for name in sys.argv[1:] or sorted(capabilities()):
        run(name)
        torch.cuda.synchronize()
        print(f"{name}: ok", flush=True)
