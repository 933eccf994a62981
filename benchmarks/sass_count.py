"""Static cost of the Mamba-1 step-loop kernels without a GPU: compile them for sm_90 (H100/H200) with
Triton's bundled ptxas and print registers, spills and, per loop of the SASS, the instructions per
sequence step and the counts of the costly kinds (MUFU, SHFL, global loads/stores, local spills).

It predicts before the device is used: a step loop of N instructions a channel-step over
batch * seqlen * dim channel-steps issues batch * seqlen * dim * N / 32 warp instructions, against about
1.05e12 a second on an H200 (132 SMs x 4 schedulers x 1.98 GHz). The anchor shape is bf16 x, dt, B, C, z
with D, z, dt_bias and softplus.

    python benchmarks/sass_count.py --out bench_out/sass_count.json
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mambakit.ops.selective_scan.triton.seq_bwd import (  # noqa: E402
    _adjoint_chunk_kernel,
    selective_scan_bwd_seq_kernel,
)
from mambakit.ops.selective_scan.triton.seq_fwd import selective_scan_fwd_seq_kernel  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

_HALF = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "dx_ptr", "ddt_ptr", "dz_ptr")
_COMMON = dict(HAS_Z=True, HAS_DT_BIAS=True, HAS_SEQ_IDX=False, DT_SOFTPLUS=True, ACC=tl.float32)


def kernels() -> list[tuple[str, object, dict, dict, int]]:
    """(name, kernel, constexprs, launch options, steps per loop iteration) at the defaults."""
    fwd = dict(_COMMON, HAS_D=True, HAS_H0=True, BLOCK_D=32, BLOCK_N=16, NUM_STAGES=1)
    bwd = dict(_COMMON, HAS_D=True, HAS_H0=True, HAS_CARRY=True, WRITE_DH0=False, BLOCK_D=32, BLOCK_N=16)
    return [
        ("fwd rescan (writes y)", selective_scan_fwd_seq_kernel, dict(fwd, WRITE_Y=True, WRITE_DECAY=False),
         {}, 1),
        ("fwd chunk pass (decays)", selective_scan_fwd_seq_kernel,
         dict(fwd, WRITE_Y=False, WRITE_DECAY=True), {}, 1),
        ("bwd adjoint chunk pass", _adjoint_chunk_kernel, dict(_COMMON, BLOCK_D=32, BLOCK_N=16), {}, 1),
        ("bwd default (SEG 2, preload, maxnreg 168)", selective_scan_bwd_seq_kernel,
         dict(bwd, SEG=2, PRELOAD=True), {"maxnreg": 168}, 2),
        ("bwd SEG 2, preload, no cap", selective_scan_bwd_seq_kernel, dict(bwd, SEG=2, PRELOAD=True), {}, 2),
        ("bwd SEG 4, volatile reloads", selective_scan_bwd_seq_kernel,
         dict(bwd, SEG=4, PRELOAD=False), {}, 4),
    ]  # fmt: skip


def compile_sm90(kernel, constexprs: dict, options: dict) -> tuple[dict, str]:
    """Resource usage and SASS of the kernel compiled for sm_90 (every non-constexpr scalar an i32)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in _HALF else ("*i32" if name == "seq_idx_ptr" else "*fp32")
        else:
            sig[name] = "i32"
    compiled = triton.compile(
        ASTSource(kernel, sig, constexprs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": 1, **options},
    )
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [tools / "cuobjdump", "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [tools / "cuobjdump", "-sass", f.name], capture_output=True, text=True, check=True
        )
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}, sass.stdout


def loops(sass: str) -> list[list[str]]:
    """The instruction lists of the SASS's loops (a backward branch and what it jumps over)."""
    ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    out = []
    for addr, text in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", text)
        if m and m.group(1) and int(m.group(1), 16) < addr:
            out.append([t for a, t in ins if int(m.group(1), 16) <= a <= addr])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/sass_count.json")
    args = parser.parse_args()
    rows, results = [], []
    for name, kernel, constexprs, options, steps in kernels():
        usage, sass = compile_sm90(kernel, constexprs, options)
        for i, body in enumerate(loops(sass)):
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)

            def count(pattern: str, ops=ops) -> int:
                return sum(v for k, v in ops.items() if re.match(pattern, k))

            per_step = {
                "instructions": len(body) / steps,
                "MUFU": count(r"MUFU") / steps,
                "SHFL": count(r"SHFL") / steps,
                "global loads": count(r"LDG") / steps,
                "global stores": count(r"STG") / steps,
                "spill loads/stores": count(r"(LDL|STL)") / steps,
            }
            rows.append([name, i, usage["registers"], usage["stack_bytes"], *per_step.values()])
            results.append(dict(kernel=name, loop=i, **usage, per_step=per_step))
    headers = ["kernel", "loop", "regs", "spill B", "instr/step", "MUFU", "SHFL", "LDG", "STG", "LDL+STL"]
    print_table(headers, rows)
    write_json(args.out, {"environment": environment(), "target": "sm_90", "results": results})


if __name__ == "__main__":
    main()
