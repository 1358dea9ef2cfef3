"""Checks that the CUDA emulator tests can see synchronisation bugs: for every __syncthreads() and
cp.async wait in the kernels they run (sigmoid attention, the fused-MoE GEMM), builds the kernel's
emulator test against a copy of csrc/ with that one barrier deleted (or the wait relaxed by one
group) and expects the test to fail.

    python scripts/emu_mutations.py [--cuda-include DIR] [--jobs N] [--only SUBSTRING]

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
TESTS = os.path.join(ROOT, "tests", "cpp")
# kernel source (under csrc/) -> the emulator test that runs it
KERNEL_FILES = {
    "sigmoid_attention/cuda/sigmoid_attention_fwd.cuh": "test_sigmoid_attention_cuda_emu.cpp",
    "sigmoid_attention/cuda/sigmoid_attention_bwd.cuh": "test_sigmoid_attention_cuda_emu.cpp",
    "sigmoid_attention/cuda/sigmoid_attention_fp32_cuda.cu": "test_sigmoid_attention_cuda_emu.cpp",
    "fused_moe/cuda/fused_moe_gemm.cuh": "test_fused_moe_cuda_emu.cpp",
}


def find_cuda_include():
    sys.path.insert(0, ROOT)
    from build_config import cuda_header_dir  # noqa: E402

    inc = cuda_header_dir()
    if inc is None:
        raise SystemExit("no CUDA headers found (pass --cuda-include)")
    return inc


def mutants(only):
    for rel in KERNEL_FILES:
        if only not in rel:
            continue
        text = open(os.path.join(ROOT, "csrc", rel)).read()
        for m in re.finditer(r"__syncthreads\(\);", text):
            line = text.count("\n", 0, m.start()) + 1
            yield rel, f"{os.path.basename(rel)}:{line} delete __syncthreads", text[: m.start()] + text[m.end():]
        for m in re.finditer(r"cp_async_wait<(\d)>\(\);", text):
            line = text.count("\n", 0, m.start()) + 1
            n = int(m.group(1))
            mutated = text[: m.start()] + f"cp_async_wait<{n + 1}>();" + text[m.end():]
            yield rel, f"{os.path.basename(rel)}:{line} cp_async_wait<{n}> -> <{n + 1}>", mutated


def torch_includes():
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def run_one(rel, name, mutated, cuda_include, workdir):
    tree = os.path.join(workdir, "csrc")
    shutil.copytree(os.path.join(ROOT, "csrc"), tree)
    with open(os.path.join(tree, rel), "w") as f:
        f.write(mutated)
    exe = os.path.join(workdir, "t")
    test = os.path.join(TESTS, KERNEL_FILES[rel])
    cmd = ["g++", "-std=c++20", "-O1", "-DACCEL_CUDA_EMU", f"-I{tree}", f"-I{TESTS}", f"-I{cuda_include}"]
    if "fused_moe" in rel:  # at::ScalarType and TORCH_CHECK: the c10 headers and library
        inc = torch_includes()
        lib = os.path.join(os.path.dirname(inc[0]), "lib")
        cmd += [f"-I{p}" for p in inc] + [test, f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}"]
    else:
        cmd.append(test)
    cc = subprocess.run(cmd + ["-o", exe], capture_output=True, text=True)
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
    ap.add_argument("--only", default="", help="mutate only the kernel files whose path contains this")
    args = ap.parse_args()
    inc = args.cuda_include or find_cuda_include()
    todo = list(mutants(args.only))
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
