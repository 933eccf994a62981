"""Static cost of Triton kernels without a GPU: compile them for sm_90 (H100/H200) with Triton's bundled
ptxas and print registers, spills and, per loop of the SASS, the instructions per unit of work and the
counts of the costly kinds (MUFU, SHFL, barriers, global loads/stores, local spills). `--kernels scan`
(default): the Mamba-1 step-loop kernels, per sequence step. `--kernels ssd`: the SSD output pass (per
64-row step) and chunk-backward kernels (per 64 x 64 tile), which Nsight Compute found issue-bound
(docs/benchmarks.md, eighth session); its count of the output pass's step, 1,255 instructions under
Triton 3.6, matched the 1,270 warp instructions a step that ncu measured on the H200.
`--kernels conv-norm`: the conv1d and norm kernels of a training step, per element a thread handles,
compiled as the launcher specializes them (unit column strides, 16-divisible pointers and row
strides); a kernel without a loop is counted whole.

It predicts before the device is used: a step loop of N instructions a channel-step over
batch * seqlen * dim channel-steps issues batch * seqlen * dim * N / 32 warp instructions, against about
1.05e12 a second on an H200 (132 SMs x 4 schedulers x 1.98 GHz). The anchor shape is bf16 x, dt, B, C, z
with D, z, dt_bias and softplus.

    python benchmarks/sass_count.py --out bench_out/sass_count.json
    python benchmarks/sass_count.py --kernels conv-norm --out bench_out/sass_conv_norm.json
    python benchmarks/sass_count.py --kernels ssd --out bench_out/sass_ssd.json
    python benchmarks/sass_count.py --kernels ssd-variants --out bench_out/sass_ssd_variants.json
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
from mambakit.ops.conv1d.triton.kernels import conv_bwd_kernel, conv_fwd_kernel  # noqa: E402
from mambakit.ops.norm.triton.kernels import norm_bwd_kernel  # noqa: E402
from mambakit.ops.selective_scan.triton.seq_bwd import (  # noqa: E402
    _adjoint_chunk_kernel,
    selective_scan_bwd_seq_kernel,
)
from mambakit.ops.selective_scan.triton.seq_fwd import selective_scan_fwd_seq_kernel  # noqa: E402

from _common import environment, print_table, write_json  # noqa: E402

_HALF = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr", "dy_ptr", "dx_ptr", "ddt_ptr", "dz_ptr")
_COMMON = dict(HAS_Z=True, HAS_DT_BIAS=True, HAS_SEQ_IDX=False, DT_SOFTPLUS=True, ACC=tl.float32)


def kernels() -> list[tuple[str, object, dict, dict, int]]:
    """(name, kernel, constexprs, launch options, steps per loop iteration) at the defaults: the scan
    kernels, compiled with every non-constexpr scalar an i32, the strides and sizes with Triton's
    divisible-by-16 hint as the launch specializes them at the anchor. The hints decide layouts and
    vectorization: without them the forward's rescan compiled to 367 instructions a step with dstate
    spread over 16 lanes, with them to 236 (Triton 3.6, 2026-12-01), and the backward's pass 2 to
    1,158 against 757, so counts made without them (before 2026-12-01's ninth session) overstate."""
    from mambakit.ops.selective_scan.triton.scan_fwd import seq_config
    from mambakit.ops.selective_scan.triton.seq_bwd import chunk_pass_blocks

    block_d, warps, _ = seq_config(4096)
    (pbd, pnw), (abd, anw) = chunk_pass_blocks(4096)
    fwd = dict(_COMMON, HAS_D=True, HAS_H0=True, BLOCK_D=block_d, BLOCK_N=16, NUM_STAGES=1, EVEN_D=True,
               EVEN_N=True)  # fmt: skip
    bwd = dict(_COMMON, HAS_D=True, HAS_CARRY=True, WRITE_DH0=False, BLOCK_D=32, BLOCK_N=16)
    return [
        (f"fwd rescan (writes y), {block_d} channels / {warps} warps", selective_scan_fwd_seq_kernel,
         dict(fwd, WRITE_Y=True, WRITE_DECAY=False), {"num_warps": warps}, block_d // (32 * warps)),
        (f"fwd chunk pass (decays), {block_d} channels / {warps} warps", selective_scan_fwd_seq_kernel,
         dict(fwd, WRITE_Y=False, WRITE_DECAY=True), {"num_warps": warps}, block_d // (32 * warps)),
        (f"bwd checkpoint pass (SEG 2), {pbd} channels / {pnw} warps", selective_scan_fwd_seq_kernel,
         dict(fwd, BLOCK_D=pbd, WRITE_Y=False, WRITE_DECAY=False, CKPT_SEG=2), {"num_warps": pnw},
         pbd // (32 * pnw)),
        (f"bwd adjoint chunk pass, {abd} channels / {anw} warps", _adjoint_chunk_kernel,
         dict(_COMMON, BLOCK_D=abd, BLOCK_N=16, EVEN_D=True, EVEN_N=True), {"num_warps": anw},
         abd // (32 * anw)),
        ("bwd default (SEG 2, preload, maxnreg 168)", selective_scan_bwd_seq_kernel,
         dict(bwd, SEG=2, PRELOAD=True), {"maxnreg": 168}, 2),
        ("bwd SEG 2, preload, no cap", selective_scan_bwd_seq_kernel, dict(bwd, SEG=2, PRELOAD=True), {}, 2),
        ("bwd SEG 4, volatile reloads", selective_scan_bwd_seq_kernel,
         dict(bwd, SEG=4, PRELOAD=False), {}, 4),
    ]  # fmt: skip


# conv: bf16 x/dx/dout (fp32 g in the backward's second launch), the (dim, width) weight contiguous
_CONV_ONES = ("stride_xd", "stride_gd", "stride_dxd", "stride_od", "stride_wk")
_CONV_DIV16 = ("dim", "stride_xl", "stride_gl", "stride_dxl", "stride_ol",
               "stride_xb", "stride_gb", "stride_dxb", "stride_ob")  # fmt: skip
_NORM_DIV16 = ("dim", "stride_xm", "stride_zm", "stride_rm", "stride_dym",
               "stride_dom", "stride_dxm", "stride_dzm", "stride_drm")  # fmt: skip


def conv_norm_kernels() -> list[tuple[str, object, dict, dict, int, dict]]:
    """(name, kernel, constexprs, launch options, elements a thread, specialization) of the conv1d and
    norm kernels at a training step's defaults (width 4, SiLU, bias; Mamba-2 130M's norm groups)."""
    conv = dict(WIDTH=4, HAS_BIAS=True, HAS_INIT=False, HAS_SEQ=False, ACC=tl.float32)
    fwd = dict(conv, STORE_FINAL=False, BLOCK_L=64, BLOCK_D=128)
    bwd = dict(conv, BLOCK_W=4, HAS_DFINAL=False, BLOCK_L=16, BLOCK_D=128)
    conv_spec = dict(ones=_CONV_ONES, div16=_CONV_DIV16)
    norm = dict(NORM_BEFORE_GATE=False, HAS_DRES_OUT=False, ACC=tl.float32)
    norm_spec = dict(div16=_NORM_DIV16)
    return [
        ("conv fwd, SiLU (64x128, 8 warps)", conv_fwd_kernel, dict(fwd, SILU=True, SILU_GRAD=False),
         {"num_warps": 8}, 32, dict(conv_spec, half=("x_ptr", "out_ptr"))),
        ("conv bwd launch 1: g = dout silu'(pre)", conv_fwd_kernel, dict(fwd, SILU=False, SILU_GRAD=True),
         {"num_warps": 8}, 32, dict(conv_spec, half=("x_ptr", "dout_ptr"))),
        ("conv bwd launch 2 (16x128, 4 warps)", conv_bwd_kernel, bwd, {"num_warps": 4}, 16,
         dict(conv_spec, half=("x_ptr", "dx_ptr"))),
        ("gated norm bwd (group 1536)", norm_bwd_kernel,
         dict(norm, G=1536, HAS_Z=True, HAS_RES=False, BLOCK_M=2, BLOCK_G=2048), {"num_warps": 8}, 16,
         dict(norm_spec, half=("x_ptr", "z_ptr", "dy_ptr", "dx_ptr", "dz_ptr"))),
        ("add_rms_norm bwd (768, fp32 residual)", norm_bwd_kernel,
         dict(norm, G=768, HAS_Z=False, HAS_RES=True, BLOCK_M=4, BLOCK_G=1024, HAS_DRES_OUT=True),
         {"num_warps": 8}, 16, dict(norm_spec, half=("x_ptr", "dy_ptr", "dx_ptr"))),
    ]  # fmt: skip


def ssd_kernels() -> list[tuple[str, object, dict, dict, int, dict]]:
    """(name, kernel, constexprs, launch options, steps per loop iteration, specialization) of the SSD
    output pass and chunk-backward kernels at the benchmark anchor's tuned launches (bf16 x/B/C,
    headdim 64, dstate 128, D, no z, no seq_idx; unit inner strides, 16-divisible sizes and strides).
    The output pass's inner loop is one 64-row step; a chunk-backward loop, one (64 x 64) tile."""
    from mambakit.ops.ssd.triton import bwd_chunk, chunk_scan

    half = ("x_ptr", "B_ptr", "C_ptr", "y_ptr", "z_ptr", "ypre_ptr", "dy_ptr", "dx_ptr")

    def spec(kernel):
        names = kernel.arg_names
        ones = tuple(n for n in names if re.fullmatch(r"s\w+_(p|n)", n))
        sizes = ("seqlen", "headdim", "dstate", "chunk_size")
        div16 = tuple(n for n in names if (n.startswith("s") and n not in ones) or n in sizes)
        return dict(half=half, ones=ones, div16=div16)

    def jit(kernel):  # the JIT function under CachedTuning / triton.autotune
        return getattr(getattr(kernel, "tuned", kernel), "fn", kernel)

    scan = jit(chunk_scan.chunk_scan_fwd_tuned)
    common = dict(HAS_D=True, HAS_Z=False, HAS_SEQ=False, HAS_INIT=False, FULL=True, BLOCK_P=64, BLOCK_N=128,
                  PREC="ieee", DOT_F32=False)  # fmt: skip
    tile = dict(common, BLOCK_M=64, BLOCK_K=64)  # FULL from common
    out = [
        ("ssd output pass, sequential, no grad (64,4,1)", scan,
         dict(common, SEQUENTIAL=True, STORE_STATES=False, SUB=64), {"num_warps": 4, "num_stages": 1}, 1),
        ("ssd output pass, chunked (64,4,1)", scan,
         dict(common, SEQUENTIAL=False, STORE_STATES=True, SUB=64), {"num_warps": 4, "num_stages": 1}, 1),
    ]  # fmt: skip
    for name in ("dx", "dB", "dC"):
        kernel = jit(getattr(bwd_chunk, f"chunk_bwd_{name}_kernel"))
        out.append((f"ssd chunk_bwd_{name} (64,64,4,2)", kernel, tile, {"num_warps": 4, "num_stages": 2}, 1))
    kept = []
    for name, kernel, constexprs, options, per in out:
        constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
        kept.append((name, kernel, constexprs, options, per, spec(kernel)))
    return kept


def ssd_variants() -> list[tuple[str, object, dict, dict, int, dict]]:
    """The SSD kernels of `ssd_kernels` over the launch variants the GPU may compile: bf16 (64-row
    steps and tiles) and fp32 (32), full and masked tiles, with and without seq_idx and z, both output
    paths (each counted like `ssd_kernels`; mainly a check that every variant compiles for sm_90)."""
    import itertools

    base = {name: (kernel, spec) for name, kernel, _, _, _, spec in ssd_kernels()}
    scan, scan_spec = base["ssd output pass, chunked (64,4,1)"]
    flags = itertools.product(["bf16", "fp32"], [True, False], [True, False], [True, False])
    out = []
    for dtype, full, seq, z in flags:
        sub, stages = (64, 2) if dtype == "bf16" else (32, 1)
        tag = f"{dtype}, {'full' if full else 'masked'}{', seq_idx' if seq else ''}{', z' if z else ''}"
        common = dict(HAS_D=True, HAS_Z=z, HAS_SEQ=seq, HAS_INIT=True, FULL=full, BLOCK_P=64, BLOCK_N=128,
                      PREC="ieee", DOT_F32=False)  # fmt: skip
        todo = [
            (f"output pass, {'sequential' if sq else 'chunked'}, {tag}", scan, scan_spec,
             dict(common, SEQUENTIAL=sq, STORE_STATES=True, SUB=sub), {"num_warps": 4, "num_stages": 1})
            for sq in (True, False)
        ]  # fmt: skip
        for name in ("dx", "dB", "dC"):
            kernel, spec = base[f"ssd chunk_bwd_{name} (64,64,4,2)"]
            todo.append((f"chunk_bwd_{name}, {tag}", kernel, spec, dict(common, BLOCK_M=sub, BLOCK_K=sub),
                         {"num_warps": 4, "num_stages": stages}))  # fmt: skip
        for name, kernel, spec, constexprs, options in todo:
            constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
            spec = dict(spec, half=spec["half"] if dtype == "bf16" else ())
            out.append((name, kernel, constexprs, options, 1, spec))
    return out


def compile_sm90(kernel, constexprs: dict, options: dict, half=_HALF, ones=(), div16=()) -> tuple[dict, str]:
    """Resource usage and SASS of the kernel compiled for sm_90. Pointers named in `half` are bf16, the
    rest float32; scalars are i32, except those in `ones` (the constant 1, as Triton specializes a unit
    stride); pointers and the scalars in `div16` carry Triton's divisible-by-16 hint when `div16` is
    given (as it specializes aligned arguments)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs, attrs = {}, dict(constexprs), {}
    for param in kernel.params:  # constexpr parameters left out take their defaults, as a launch does
        if param.is_constexpr and param.has_default and param.name not in constexprs:
            constexprs[param.name] = param.default
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if name in ones:
            constexprs[name] = 1
            sig[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            sig[name] = (
                "*bf16" if name in half else ("*i32" if name in ("seq_idx_ptr", "seq_ptr") else "*fp32")
            )
        else:
            sig[name] = "i32"
        if div16 and (name.endswith("_ptr") or name in div16):
            attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(
        ASTSource(kernel, sig, constexprs, attrs),
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


def instructions(sass: str) -> list[str]:
    """Every instruction of the SASS, in order."""
    return [t.strip() for t in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=["scan", "conv-norm", "ssd", "ssd-variants"], default="scan")
    parser.add_argument("--out", default="bench_out/sass_count.json")
    args = parser.parse_args()
    if args.kernels == "scan":
        sizes = ("seqlen", "dim", "dstate", "dim_per_group")
        todo = [
            (n, k, c, o, steps, {"div16": sizes + tuple(a for a in k.arg_names if a.startswith("s_"))})
            for n, k, c, o, steps in kernels()
        ]
        unit = "step"
    elif args.kernels in ("ssd", "ssd-variants"):
        todo = ssd_kernels() if args.kernels == "ssd" else ssd_variants()
        unit = "step"
    else:
        todo = conv_norm_kernels()
        unit = "element"
    rows, results = [], []
    for name, kernel, constexprs, options, per, spec in todo:
        usage, sass = compile_sm90(kernel, constexprs, options, **spec)
        bodies = loops(sass) or [instructions(sass)]  # no loop: the whole kernel
        for i, body in enumerate(bodies):
            ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body)

            def count(pattern: str, ops=ops) -> int:
                return sum(v for k, v in ops.items() if re.match(pattern, k))

            per_unit = {
                "instructions": len(body) / per,
                "MUFU": count(r"MUFU") / per,
                "SHFL": count(r"SHFL") / per,
                "barriers": count(r"BAR") / per,
                "global loads": count(r"LDG") / per,
                "global stores": count(r"STG") / per,
                "spill loads/stores": count(r"(LDL|STL)") / per,
            }
            rows.append([name, i, usage["registers"], usage["stack_bytes"], *per_unit.values()])
            results.append(dict(kernel=name, loop=i, **usage, unit=unit, per_unit=per_unit))
    headers = ["kernel", "loop", "regs", "spill B", f"instr/{unit}", "MUFU", "SHFL", "BAR", "LDG", "STG",
               "LDL+STL"]  # fmt: skip
    print_table(headers, rows)
    write_json(args.out, {"environment": environment(), "target": "sm_90", "results": results})


if __name__ == "__main__":
    main()
