"""Host time of one eager SSD forward on the GPU, and where it goes (cProfile).

At short sequences the eager Triton forward is host-bound: its kernels finish before Python has
issued the next call's launches (docs/benchmarks.md: 0.36 ms eager against 0.18 ms in CUDA graph
replay at the anchor, seqlen 2048). This times N calls issued back to back, without a sync in between
(host us a call = wall time / N, which is the eager rate whenever the host is the bottleneck), the GPU
time of one call by CUDA graph replay, and prints the top functions by cumulative host time.

    python benchmarks/gpu_ssd_host.py --out results/gpu_ssd_host.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ssd import ANCHOR, make_inputs, run_ssd  # noqa: E402

from _common import environment, write_json  # noqa: E402


def host_us(fn, calls: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / calls * 1e6


def graph_us(fn, calls: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_ssd_host.py needs a CUDA device")
    a = ANCHOR
    ins = make_inputs(a["batch"], args.seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])

    def fwd():
        with torch.no_grad():
            return run_ssd("triton", ins, a["chunk"])

    host = host_us(fwd, args.calls)
    gpu = graph_us(fwd, args.calls)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        fwd()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(args.top)
    print(text.getvalue())
    print(f"seqlen {args.seqlen}: host {host:.1f} us a call, GPU (graph replay) {gpu:.1f} us a call")
    if args.out:
        payload = {"env": environment(), "anchor": ANCHOR, "seqlen": args.seqlen, "host_us_per_call": host}
        write_json(args.out, payload | {"graph_us_per_call": gpu, "profile": text.getvalue()})


if __name__ == "__main__":
    main()
