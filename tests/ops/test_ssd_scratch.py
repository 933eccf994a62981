"""The SSD torch backend's forward-only scratch buffers: results never alias them, modes mix safely."""

from __future__ import annotations

import torch

from mambakit.ops import _scratch, ssd


def _inputs(seed: int, L: int = 40, h: int = 4, p: int = 3, g: int = 2, n: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(2, L, h, p, generator=gen),
        dt=torch.randn(2, L, h, generator=gen) * 0.5,
        A=-torch.rand(h, generator=gen) - 0.5,
        B=torch.randn(2, L, g, n, generator=gen),
        C=torch.randn(2, L, g, n, generator=gen),
        D=torch.randn(h, generator=gen),
        dt_softplus=True,
    )


def test_results_survive_later_calls_and_modes():
    a, b = _inputs(0), _inputs(1)
    with torch.no_grad():
        y_a, h_a = ssd(**a, chunk_size=8, return_final_state=True, backend="torch")
        expect_y, expect_h = y_a.clone(), h_a.clone()
        ssd(**b, chunk_size=8, return_final_state=True, backend="torch")  # reuses the scratch
    with torch.inference_mode():
        y_i, h_i = ssd(**a, chunk_size=8, return_final_state=True, backend="torch")
    y_r, h_r = ssd(**a, chunk_size=8, return_final_state=True, backend="reference")
    torch.testing.assert_close(y_a, expect_y, rtol=0, atol=0)
    torch.testing.assert_close(h_a, expect_h, rtol=0, atol=0)
    for y, h in ((y_a, h_a), (y_i, h_i)):
        torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_r, rtol=1e-5, atol=1e-5)


def test_large_buffers_are_not_kept(monkeypatch):
    monkeypatch.setattr(_scratch, "MAX_BYTES", 0)
    a = _inputs(2)
    with torch.no_grad():
        y = ssd(**a, chunk_size=8, backend="torch")
    torch.testing.assert_close(y, ssd(**a, chunk_size=8, backend="reference"), rtol=1e-5, atol=1e-5)


def test_release_drops_the_buffers():
    with torch.no_grad():
        ssd(**_inputs(3), chunk_size=8, backend="torch")
    assert _scratch._LOCAL.__dict__.get("bufs")
    _scratch.release()
    assert not _scratch._LOCAL.__dict__.get("bufs")
