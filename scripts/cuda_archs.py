"""List the GPU architectures whose machine code is linked into accel/_C (no cuobjdump needed).

Walks the CUDA ELF images (cubins) embedded in the extension's .nv_fatbin and reads each one's
target SM from its ELF header (e_flags bits 8-15 for the current CUDA ELF ABI).
"""
import collections
import glob
import sys
from pathlib import Path


def cubin_archs(path: str) -> collections.Counter:
    data = Path(path).read_bytes()
    found = collections.Counter()
    i = data.find(b"\x7fELF", 1)
    while i >= 0:
        osabi = data[i + 7]
        if osabi in (0x33, 0x41):  # ELFOSABI_CUDA, old and new
            flags = int.from_bytes(data[i + 48:i + 52], "little")
            sm = (flags >> 8) & 0xFF if osabi == 0x41 else flags & 0xFF
            found[f"sm_{sm}"] += 1
        i = data.find(b"\x7fELF", i + 1)
    return found


if __name__ == "__main__":
    paths = sys.argv[1:] or glob.glob(str(Path(__file__).resolve().parent.parent / "accel" / "_C*.so"))
    for p in paths:
        archs = cubin_archs(p)
        listing = ", ".join(f"{a} ({n} cubins)" for a, n in sorted(archs.items())) or "none (CPU-only build)"
        print(f"{Path(p).name}: GPU code for {listing}")
