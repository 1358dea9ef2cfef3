"""Checks that the CUDA emulator test can see synchronisation bugs: for every __syncthreads() and
cp.async wait in the sigmoid-attention kernels, builds the emulator test against a copy of csrc/
with that one barrier deleted (or the wait relaxed by one group) and expects the test to fail.

    python scripts/emu_mutations.py [--cuda-include DIR] [--jobs N]

Prints one line per mutant (caught / SURVIVED) and exits 1 if any survived. A survivor is either a
barrier the kernel does not need or a gap in the test's cases or schedules. Takes a few minutes.
"""
import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FILES = [
    "sigmoid_attention/cuda/sigmoid_attention_kernels.cuh",
    "sigmoid_attention/cuda/sigmoid_attention_fp32_cuda.cu",
]
TEST = os.path.join(ROOT, "tests", "cpp", "test_sigmoid_attention_cuda_emu.cpp")


def find_cuda_include():
    sys.path.insert(0, ROOT)
    from build_config import cuda_header_dir  # noqa: E402

    inc = cuda_header_dir()
    if inc is None:
        raise SystemExit("no CUDA headers found (pass --cuda-include)")
    return inc


def mutants():
    for rel in KERNEL_FILES:
        text = open(os.path.join(ROOT, "csrc", rel)).read()
        for m in re.finditer(r"__syncthreads\(\);", text):
            line = text.count("\n", 0, m.start()) + 1
            yield rel, f"{os.path.basename(rel)}:{line} delete __syncthreads", text[: m.start()] + text[m.end():]
        for m in re.finditer(r"cp_async_wait<(\d)>\(\);", text):
            line = text.count("\n", 0, m.start()) + 1
            n = int(m.group(1))
            mutated = text[: m.start()] + f"cp_async_wait<{n + 1}>();" + text[m.end():]
            yield rel, f"{os.path.basename(rel)}:{line} cp_async_wait<{n}> -> <{n + 1}>", mutated


def run_one(rel, name, mutated, cuda_include, workdir):
    tree = os.path.join(workdir, "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), tree)
    with open(os.path.join(tree, rel), "w") as f:
        f.write(mutated)
    exe = os.path.join(workdir, "t")
    cc = subprocess.run(["g++", "-std=c++20", "-O1", "-DACCEL_CUDA_EMU", f"-I{tree}", f"-I{cuda_include}", TEST,
                         "-o", exe], capture_output=True, text=True)
    if cc.returncode != 0:
        return name, "compile error: " + cc.stderr.strip().splitlines()[0][:120]
    try:
        r = subprocess.run([exe], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return name, "caught (hang)"
    if r.returncode != 0:
        failed = [ln.split("  ")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
        how = f"{len(failed)} failing runs" if failed else (r.stderr.strip().splitlines() or ["abort"])[-1][:80]
        return name, f"caught ({how})"
    return name, "SURVIVED"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda-include", default=None)
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args()
    inc = args.cuda_include or find_cuda_include()
    todo = list(mutants())
    survived = 0
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(args.jobs) as pool:
        futs = [pool.submit(run_one, rel, name, text, inc, os.path.join(tmp, str(i)))
                for i, (rel, name, text) in enumerate(todo)]
        for fut in futs:
            name, verdict = fut.result()
            survived += verdict == "SURVIVED"
            print(f"{verdict:<28} {name}", flush=True)
    print(f"{len(todo) - survived} of {len(todo)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
