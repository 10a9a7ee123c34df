"""Haar DWT/IDWT: closed form, agreement with pytorch_wavelets, perfect reconstruction, bf16, export."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdmap.models.wavelets import HaarDWT, HaarIDWT, haar_dwt, haar_idwt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_closed_form_on_one_block():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).reshape(1, 1, 2, 2)  # a b / c d
    ll, lh, hl, hh = (t.item() for t in haar_dwt(x))
    assert ll == pytest.approx((1 + 2 + 3 + 5) / 2)
    assert lh == pytest.approx((1 + 2 - 3 - 5) / 2)
    assert hl == pytest.approx((1 - 2 + 3 - 5) / 2)
    assert hh == pytest.approx((1 - 2 - 3 + 5) / 2)


@pytest.fixture(scope="module")
def pytorch_wavelets():
    return pytest.importorskip("pytorch_wavelets")  # needs setuptools<82 (pkg_resources)


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (1, 16, 32, 32)])
def test_dwt_matches_pytorch_wavelets(pytorch_wavelets, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    yl, yh = pytorch_wavelets.DWTForward(J=1, wave="haar")(x)
    ll, lh, hl, hh = haar_dwt(x)
    assert (ll - yl).abs().max() <= 1e-6
    for i, band in enumerate((lh, hl, hh)):
        assert (band - yh[0][:, :, i]).abs().max() <= 1e-6


def test_idwt_matches_pytorch_wavelets(pytorch_wavelets):
    g = torch.Generator().manual_seed(1)
    ll, lh, hl, hh = (torch.randn(2, 4, 6, 10, generator=g) for _ in range(4))
    ref = pytorch_wavelets.DWTInverse(wave="haar")((ll, [torch.stack((lh, hl, hh), dim=2)]))
    assert ref.shape == (2, 4, 12, 20)
    assert (haar_idwt(ll, lh, hl, hh) - ref).abs().max() <= 1e-6


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 9).map(lambda v: 2 * v),
    w=st.integers(1, 9).map(lambda v: 2 * v),
    seed=st.integers(0, 2**16),
)
def test_perfect_reconstruction(b, c, h, w, seed):
    x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(haar_idwt(*haar_dwt(x)), x, atol=1e-6, rtol=0)


def test_energy_preserved():
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    energy = sum((band**2).sum() for band in haar_dwt(x))
    assert torch.allclose(energy, (x**2).sum())


def test_odd_size_raises():
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.zeros(1, 1, 7, 8))


def test_bf16_autocast_forward_backward():
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)  # bf16 under autocast
        bands = haar_dwt(y)
        assert all(b.dtype == torch.bfloat16 for b in bands)
        out = haar_idwt(*(band * 1.5 for band in bands))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


class _Roundtrip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dwt, self.idwt = HaarDWT(), HaarIDWT()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ll, lh, hl, hh = self.dwt(x)
        return self.idwt(ll * 2, lh, hl, hh * 0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_export_and_trace():
    module = _Roundtrip()
    x = torch.randn(1, 2, 8, 8)
    expected = module(x)
    exported = torch.export.export(module, (x,))
    assert torch.allclose(exported.module()(x), expected)
    traced = torch.jit.trace(module, (x,))
    assert torch.allclose(traced(x), expected)
    assert not list(module.parameters()) and not list(module.buffers())
