"""A target for Nsight Compute: the SSD forward (or, with --backward, forward and backward) at the
benchmark anchor, run a few times, so that `ncu -k regex:...` can profile one kernel. Fix the tiles by
environment so that no autotuning launches run under the profiler:

    MAMBAKIT_SSD_SCAN_CONFIG=64,4,1 MAMBAKIT_SSD_CHUNK_CONFIG=64,64,4,2 ncu -k regex:chunk_scan_fwd \
        -s 2 -c 1 --section SpeedOfLight --section WarpStateStats --section Occupancy \
        python benchmarks/ncu_ssd_scan.py --seqlen 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ssd import ANCHOR, make_inputs, run_ssd  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seqlen", type=int, default=8192)
    parser.add_argument("--backward", action="store_true")
    parser.add_argument("--calls", type=int, default=4)
    args = parser.parse_args()
    a = ANCHOR
    shape = (a["batch"], args.seqlen, a["nheads"], a["headdim"], a["ngroups"], a["dstate"])
    ins = make_inputs(*shape, requires_grad=args.backward)
    for _ in range(args.calls):
        if args.backward:
            y = run_ssd("triton", ins, a["chunk"])
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                run_ssd("triton", ins, a["chunk"])
    torch.cuda.synchronize()
