import pytest
import torch

from gblr import gaudi_mask


def box(n, start, length):
    m = torch.zeros(n)
    for i in range(length):
        m[(start + i) % n] = 1.0
    return m


@pytest.mark.parametrize("n", [7, 8, 16, 33])
def test_exact_boxes_with_wraparound(n):
    cases = [(s, length) for s in range(n) for length in range(n + 1)]
    w = torch.tensor([length / n for _, length in cases], dtype=torch.float64)
    l = torch.tensor([s / n for s, _ in cases], dtype=torch.float64)
    masks = gaudi_mask(w, l, n)
    expected = torch.stack([box(n, s, length) for s, length in cases]).double()
    torch.testing.assert_close(masks, expected, atol=1e-9, rtol=0)


def test_zero_and_full_width():
    w = torch.tensor([0.0, 1.0, 0.0, 1.0])
    l = torch.tensor([0.3, 0.7, 0.0, 0.0])
    m = gaudi_mask(w, l, 10)
    torch.testing.assert_close(m[0], torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(m[1], torch.ones(10), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_dc_term_is_width(sigma):
    w = torch.rand(5, dtype=torch.float64)
    l = torch.rand(5, dtype=torch.float64)
    m = gaudi_mask(w, l, 12, sigma)
    # X[0] = w: the mask's mean times n / n is w
    torch.testing.assert_close(m.sum(-1) / 12, w)


@pytest.mark.parametrize("n,sigma", [(7, None), (8, None), (9, 3.0), (10, 1.0)])
def test_gradcheck(n, sigma):
    w = torch.tensor([0.0, 0.31, 0.5, 0.93, 1.0], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.1, 0.77, 0.0, 0.45, 0.9], dtype=torch.float64, requires_grad=True)
    # finite differences at widths 0 and 1 step just outside [0, 1]: the formula is defined
    # there, and check=False lets gradcheck probe it
    assert torch.autograd.gradcheck(lambda a, b: gaudi_mask(a, b, n, sigma, check=False), (w, l))


@pytest.mark.parametrize(
    ("width", "location", "n", "sigma", "match"),
    [
        ([1.5], [0.0], 8, None, r"\[0, 1\]"),
        ([-0.1], [0.0], 8, None, r"\[0, 1\]"),
        ([0.5], [float("nan")], 8, None, "finite"),
        ([float("nan")], [0.0], 8, None, "finite"),
        ([0.5], [0.0], 5.5, None, "n must be a positive integer"),
        ([0.5], [0.0], True, None, "n must be a positive integer"),
        ([0.5], [0.0], 8, float("inf"), "sigma"),
        ([0.5], [0.0], 8, 0.0, "sigma"),
    ],
)
def test_bad_arguments_are_refused(width, location, n, sigma, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gaudi_mask(torch.tensor(width), torch.tensor(location), n, sigma)


def test_gradient_at_zero_width_is_nonzero():
    w = torch.zeros(3, requires_grad=True)
    gaudi_mask(w, torch.rand(3), 16).sum().backward()
    assert bool((w.grad.abs() > 0).all())


def test_float32_under_autocast():
    w, l = torch.rand(4), torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m = gaudi_mask(w, l, 16)
    assert m.dtype == torch.float32
    torch.testing.assert_close(m, gaudi_mask(w, l, 16))


def test_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        gaudi_mask(torch.rand(2, 2), torch.rand(2, 2), 4)
    with pytest.raises(ValueError, match="same length"):
        gaudi_mask(torch.rand(2), torch.rand(3), 4)
    with pytest.raises(ValueError, match="n must"):
        gaudi_mask(torch.rand(2), torch.rand(2), 0)


def _full_spectrum_mask(width, location, n, sigma):
    """The SPEC formula over all n//2 + 1 frequencies, as a reference."""
    import math

    w, loc = width.unsqueeze(1), location.unsqueeze(1)
    k = torch.arange(n // 2 + 1, dtype=width.dtype)
    amplitude = w * torch.sinc(k * w) / torch.sinc(k / n)
    if sigma is not None:
        amplitude = amplitude * torch.exp(-(k * k) / (2.0 * sigma**2))
    phase = -2.0 * math.pi * k * loc - math.pi * k * (w - 1.0 / n)
    spectrum = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
    return torch.fft.irfft(spectrum, n=n, dim=-1, norm="forward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,sigma", [(64, 0.5), (768, 1.0), (3072, 3.0), (100, 40.0)])
def test_low_pass_skips_only_frequencies_that_underflow(dtype, n, sigma):
    w = torch.rand(20, dtype=dtype, requires_grad=True)
    l = torch.rand(20, dtype=dtype, requires_grad=True)
    g = torch.randn(20, n, dtype=dtype)
    fast = gaudi_mask(w, l, n, sigma)
    ref = _full_spectrum_mask(w, l, n, sigma)
    assert torch.equal(fast, ref)
    grads_fast = torch.autograd.grad((fast * g).sum(), (w, l))
    grads_ref = torch.autograd.grad((ref * g).sum(), (w, l))
    _assert_same_gradient(grads_fast, grads_ref, dtype)


def _assert_same_gradient(grads, reference, dtype):
    """Equal up to the rounding of a sum over the frequencies (relative to the largest)."""
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    scale = max(float(b.abs().max()) for b in reference) or 1.0
    for a, b in zip(grads, reference, strict=True):
        assert float((a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,sigma", [(7, None), (8, None), (33, None), (256, None),
                                     (16, 1.0), (255, 3.0), (64, 50.0)])
def test_closed_form_gradient_equals_the_formula_derivative(dtype, n, sigma):
    """The hand-written backward pass against autograd through the formula's operations."""
    gen = torch.Generator().manual_seed(n)
    w = torch.rand(24, dtype=dtype, generator=gen).requires_grad_()
    l = torch.rand(24, dtype=dtype, generator=gen).requires_grad_()
    g = torch.randn(24, n, dtype=dtype, generator=gen)
    ref = _full_spectrum_mask(w, l, n, sigma)
    mask = gaudi_mask(w, l, n, sigma)
    grads = torch.autograd.grad((mask * g).sum(), (w, l))
    _assert_same_gradient(grads, torch.autograd.grad((ref * g).sum(), (w, l)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sigma", [None, 0.5, 3.0, 60.0])
@pytest.mark.parametrize("n", [1, 2, 9, 16, 384])
def test_on_grid_masks_equal_the_formula(dtype, sigma, n):
    """``on_grid`` builds masks from the edge tables (sharp ones as boxes); values and
    gradients are the formula's, wrap-around, empty and full boxes included."""
    gen = torch.Generator().manual_seed(n)
    lengths = torch.cat([torch.tensor([0, n]), torch.randint(0, n + 1, (38,), generator=gen)])
    starts = torch.randint(0, n, (40,), generator=gen)
    # rounded as the layer rounds: value + (rounded - value), a few ulps off the grid
    raw_w = torch.rand(40, dtype=dtype, generator=gen)
    w = (raw_w + (lengths.to(dtype) / n - raw_w)).requires_grad_()
    l = (starts.to(dtype) / n).requires_grad_()
    g = torch.randn(40, n, dtype=dtype, generator=gen)
    ref = _full_spectrum_mask(w, l, n, sigma)
    masks = gaudi_mask(w, l, n, sigma, on_grid=True)
    if sigma is None:
        expected = torch.stack([box(n, int(s), int(m)) for s, m in zip(starts, lengths,
                                                                          strict=True)])
        assert torch.equal(masks, expected.to(dtype))
    atol = (1e-12 if dtype == torch.float64 else 1e-6) * n
    torch.testing.assert_close(masks, ref, atol=atol, rtol=0)
    grads = torch.autograd.grad((masks * g).sum(), (w, l))
    _assert_same_gradient(grads, torch.autograd.grad((ref * g).sum(), (w, l)), dtype)


def test_on_grid_masks_are_differentiable_once():
    w = torch.tensor([0.25, 0.5], requires_grad=True)
    l = torch.tensor([0.0, 0.75], requires_grad=True)
    (gw,) = torch.autograd.grad(gaudi_mask(w, l, 8, 2.0, on_grid=True).square().sum(), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        gw.sum().backward()


def test_second_derivatives():
    w = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    l = torch.tensor([0.0, 0.3, 0.7], dtype=torch.float64, requires_grad=True)
    for sigma in (None, 2.0):
        assert torch.autograd.gradgradcheck(
            lambda a, b, s=sigma: gaudi_mask(a, b, 11, s, check=False), (w, l))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, in torch's forward AD
@pytest.mark.parametrize("on_grid", [False, True])
@pytest.mark.parametrize("sigma", [None, 2.0])
def test_forward_mode_and_torch_func_agree_with_the_formula(on_grid, sigma):
    from torch.func import jacrev, jvp, vmap

    n = 12
    gen = torch.Generator().manual_seed(3)
    w = torch.randint(0, n + 1, (6,), generator=gen).double() / n
    l = torch.randint(0, n, (6,), generator=gen).double() / n
    tangents = (torch.randn(6, dtype=torch.float64, generator=gen),
                torch.randn(6, dtype=torch.float64, generator=gen))

    def mask(a, b):
        return gaudi_mask(a, b, n, sigma, check=False, on_grid=on_grid)

    def ref(a, b):
        return _full_spectrum_mask(a, b, n, sigma)

    for got, want in zip(jacrev(mask, argnums=(0, 1))(w, l), jacrev(ref, argnums=(0, 1))(w, l),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(jvp(mask, (w, l), tangents)[1], jvp(ref, (w, l), tangents)[1],
                               atol=1e-12, rtol=0)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        got = fwad.unpack_dual(mask(fwad.make_dual(w, tangents[0]), l)).tangent
        want = fwad.unpack_dual(ref(fwad.make_dual(w, tangents[0]), l)).tangent
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap(mask)(w.view(2, 3), l.view(2, 3)).reshape(6, n), ref(w, l),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("sigma", [None, 2.0])
def test_on_grid_rows_of_non_finite_inputs_are_nan(sigma):
    w = torch.tensor([0.5, float("nan"), 0.25])
    l = torch.tensor([0.0, 0.0, float("inf")])
    masks = gaudi_mask(w, l, 8, sigma, check=False, on_grid=True)
    assert bool(torch.isfinite(masks[0]).all()) and bool(torch.isnan(masks[1:]).all())


def test_on_grid_is_checked():
    with pytest.raises(ValueError, match="on_grid"):
        gaudi_mask(torch.tensor([0.3]), torch.tensor([0.0]), 8, on_grid=True)
    gaudi_mask(torch.tensor([0.375]), torch.tensor([0.125]), 8, on_grid=True)  # on the grid


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit, used by the mode
def test_kept_tables_are_not_placeholders_of_a_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        gaudi_mask(torch.tensor([0.5]), torch.tensor([0.25]), 8, 3.5, check=False, on_grid=True)
    args = (torch.tensor([0.5]), torch.tensor([0.25]), 8, 3.5)
    expected = _full_spectrum_mask(args[0].double(), args[1].double(), 8, 3.5).float()
    torch.testing.assert_close(gaudi_mask(*args, on_grid=True), expected, atol=1e-6, rtol=0)


def test_kept_tables_made_under_inference_mode_serve_training():
    with torch.inference_mode():
        gaudi_mask(torch.tensor([0.5]), torch.tensor([0.25]), 8, 5.5, on_grid=True)
    w = torch.tensor([0.5], requires_grad=True)
    gaudi_mask(w, torch.tensor([0.25]), 8, 5.5, on_grid=True).sum().backward()
    assert bool(torch.isfinite(w.grad).all())
