#!/usr/bin/env python3
"""The machine code (SASS) of the engine's CUDA kernels, block by block, on a machine without a GPU.

    python3 bench/kernel_sass.py                   # the tensor-core attention kernels at head size 64
    python3 bench/kernel_sass.py layernorm_backward --arch=90 --all

Compiles src/kernels/cuda/kernels.cu with nvcc for one architecture (scripts/setup-cuda.sh provides nvcc where
there is none), disassembles it with nvdisasm (NVIDIA's wheel, installed into .cuda/nvdisasm on first use), and
prints, for each kernel whose name contains one of the arguments, its registers and spills (ptxas), then each
basic block that holds tensor-core products (HMMA) or ldmatrix loads (LDSM), with --all every block: its
instructions, HMMA, LDSM, shared-memory loads and stores (LDS, STS), global ones (LDG, STG), MUFU (exp2 and
the like), integer multiply-adds (IMAD) and local-memory accesses (spills). A loop body
that is one block runs its instructions once per iteration, so a block's count is what a warp issues for it.
Static counts, not timings: they show what a change removes, and bench/gpu-check.sh measures the time.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "crates", "nanogpt-core", "src", "kernels", "cuda", "kernels.cu")
NVDISASM_DIR = os.path.join(ROOT, ".cuda", "nvdisasm")
NVDISASM = os.path.join(NVDISASM_DIR, "nvidia", "cu13", "bin", "nvdisasm")
DEFAULT_KERNELS = ["attention_forward_tc_hs64", "attention_backward_query_tc_hs64", "attention_backward_key_tc_hs64"]


def fail(message):
    sys.exit(f"kernel_sass: {message}")


def compile_cubin(arch, cubin):
    """nvcc's cubin and ptxas's report (registers and spills per kernel)."""
    command = (
        'eval "$(bash scripts/setup-cuda.sh)" && '
        f"nvcc -cubin -O3 -std=c++17 -arch=sm_{arch} -Xptxas -v -o {cubin} {KERNELS}"
    )
    run = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"nvcc failed (fix the error above, or the toolkit with `bash scripts/setup-cuda.sh`):\n{run.stderr}")
    return run.stderr


def ptxas_lines(report):
    """Kernel name -> ptxas's lines about it."""
    lines, name = collections.defaultdict(list), None
    for line in report.splitlines():
        match = re.search(r"Compiling entry function '(\w+)'", line)
        if match:
            name = match.group(1)
        elif name and ("registers" in line or "spill" in line):
            lines[name].append(line.replace("ptxas info    :", "").strip())
    return lines


def ensure_nvdisasm():
    if not os.path.exists(NVDISASM):
        print("kernel_sass: installing nvidia-cuda-nvdisasm into .cuda/nvdisasm", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target", NVDISASM_DIR,
             "nvidia-cuda-nvdisasm==13.*"],
            check=True,
        )
        os.chmod(NVDISASM, 0o755)


def disassemble(cubin):
    """Kernel name -> its basic blocks, each a (label, [opcode, ...]) in address order. A label that no branch
    names (nvdisasm writes some) does not start a block."""
    text = subprocess.run([NVDISASM, "-c", cubin], capture_output=True, text=True, check=True).stdout
    listings, lines = {}, None
    for line in text.splitlines():
        start = re.match(r"^\.text\.(\w+):", line)
        if start:
            lines = listings.setdefault(start.group(1), [])
        elif lines is not None:
            lines.append(line)
    kernels = {}
    for name, lines in listings.items():
        targets = set(re.findall(r"`\((\.L_x_\d+)\)", "\n".join(lines)))
        blocks = [("entry", [])]
        for line in lines:
            label = re.match(r"^(\.L_x_\d+):", line)
            if label and label.group(1) in targets:
                blocks.append((label.group(1), []))
                continue
            instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
            if instruction:
                # Drop the predicate (@P0, @!PT) and the modifiers: HMMA.16816.F32.BF16 counts as HMMA.
                opcode = re.sub(r"^@!?U?P\w+\s+", "", instruction.group(1)).split()[0].split(".")[0]
                blocks[-1][1].append(opcode)
        kernels[name] = blocks
    return kernels


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernels", nargs="*", help="parts of kernel names (default: the tensor-core attention kernels at head size 64)")
    parser.add_argument("--arch", default="90", help="compute capability without the dot (default 90, Hopper)")
    parser.add_argument("--all", action="store_true", help="every basic block, not only those with HMMA or LDSM")
    args = parser.parse_args()
    wanted = args.kernels or DEFAULT_KERNELS

    with tempfile.TemporaryDirectory() as scratch:
        cubin = os.path.join(scratch, "kernels.cubin")
        report = ptxas_lines(compile_cubin(args.arch, cubin))
        ensure_nvdisasm()
        kernels = disassemble(cubin)

    names = sorted(name for name in kernels if any(part in name for part in wanted))
    if not names:
        fail(f"no kernel's name contains {' or '.join(wanted)}; the kernels are the extern \"C\" entry points of {KERNELS}")
    columns = ["HMMA", "LDSM", "LDS", "STS", "LDG", "STG", "MUFU", "IMAD"]
    for name in names:
        blocks = kernels[name]
        print(f"{name}: {sum(len(ops) for _, ops in blocks)} instructions; {'; '.join(report.get(name, []))}")
        print(f"  {'block':<12}{'instructions':>13}" + "".join(f"{c:>7}" for c in columns) + f"{'spills':>8}")
        for label, ops in blocks:
            count = collections.Counter(ops)
            if not args.all and count["HMMA"] == 0 and count["LDSM"] == 0:
                continue
            row = "".join(f"{count[c]:>7}" for c in columns)
            print(f"  {label:<12}{len(ops):>13}{row}{count['STL'] + count['LDL']:>8}")


if __name__ == "__main__":
    main()
