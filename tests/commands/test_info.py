"""`mambakit info` lists every op package (each folder of mambakit/ops with an api.py) and its backends."""

from __future__ import annotations

import argparse
from pathlib import Path

import mambakit.ops
from mambakit.commands import info


def test_info_lists_every_op(capsys):
    ops_dir = Path(mambakit.ops.__file__).parent
    packages = sorted(p.parent.name for p in ops_dir.glob("*/api.py"))
    assert sorted(info.OPS) == packages
    assert info.run(argparse.Namespace()) == 0
    out = capsys.readouterr().out
    for op in packages:
        line = next(row for row in out.splitlines() if row.startswith(op + " "))
        assert "reference" in line and "torch" in line
