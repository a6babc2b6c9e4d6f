"""Property-based tests (Hypothesis) of the structured layers on random small shapes,
budgets and values: the budget is kept or refused cleanly, the forward pass is the dense
matrix, ``macs()`` is what the forward pass computes, and the packed form is the layer.

Hypothesis is a dev extra: each test skips itself when it is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from gblr import GBLRLinear
from gblr.core.budget import fits
from gblr.layers.base import STRUCTURES

#: Budgets that are not a fraction of the dense cost in (0, 1].
BAD_BUDGETS = [0.0, -0.25, 1.5, math.nan, math.inf, -math.inf, True, "0.5", None]


#: Examples each test ran (checked, and printed with ``pytest -s``).
RAN: dict[str, int] = {}


def _record(ran: list) -> None:
    """Note how many examples the calling test ran; most must get past ``assume``."""
    import inspect

    test = inspect.stack()[1].function
    RAN[test] = len(ran)
    print(f"{test}: {len(ran)} examples")
    assert len(ran) >= 10, f"{test}: only {len(ran)} examples ran"


def _hypothesis():
    """``(hypothesis, strategies)``, or a skip of the calling test without Hypothesis."""
    hyp = pytest.importorskip("hypothesis")
    return hyp, pytest.importorskip("hypothesis.strategies")


def _settings(hyp, examples: int):
    return hyp.settings(max_examples=examples, deadline=None, derandomize=True,
                        suppress_health_check=list(hyp.HealthCheck))


def _weight(seed: int, out_f: int, in_f: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _build(name: str, how: str, in_f: int, out_f: int, budget, seed: int):
    """A layer of structure ``name`` at ``budget``: by its constructor or by ``from_dense``."""
    cls = STRUCTURES[name]
    if how == "constructor":
        return cls(in_f, out_f, budget=budget, dtype=torch.float64)
    kwargs = {"steps": 0} if name == "gblr" else {}
    return cls.from_dense(_weight(seed, out_f, in_f), budget, **kwargs)


def _layer_strategy(st, names=None):
    """(structure, in, out, budget, seed) of a layer that may or may not be buildable."""
    return st.tuples(
        st.sampled_from(sorted(names or STRUCTURES)),
        st.integers(1, 20), st.integers(1, 20),
        st.floats(0.01, 1.0), st.integers(0, 2**16),
    )


def _buildable(name, in_f, out_f, budget, seed):
    """The layer from ``from_dense``, or None where the budget is too small for it."""
    try:
        return _build(name, "from_dense", in_f, out_f, budget, seed).eval()
    except ValueError:
        return None


# -- budgets -----------------------------------------------------------------------------------
def test_constructors_keep_the_budget_or_refuse_it():
    hyp, st = _hypothesis()
    ran = []

    @_settings(hyp, 200)
    @hyp.given(
        name=st.sampled_from(sorted(STRUCTURES)),
        how=st.sampled_from(["constructor", "from_dense"]),
        in_f=st.integers(1, 24), out_f=st.integers(1, 24),
        budget=st.one_of(st.floats(0.001, 1.0), st.floats(0.0, 1.0),
                         st.sampled_from(BAD_BUDGETS)),
        seed=st.integers(0, 2**16),
    )
    def check(name, how, in_f, out_f, budget, seed):
        if how == "constructor" and name == "gblr":
            how = "from_dense"  # GBLRLinear(budget=) is the deprecated init_fraction
        ran.append(name)
        try:
            layer = _build(name, how, in_f, out_f, budget, seed)
        except (ValueError, TypeError):
            return
        valid = (not isinstance(budget, bool | str) and budget is not None
                 and math.isfinite(budget) and 0.0 < budget <= 1.0)
        assert valid, f"{name} {how} accepted budget={budget!r}"
        layer.eval()
        assert fits(layer.macs(), budget * in_f * out_f), (
            f"{name} {how} {out_f}x{in_f} at budget={budget}: macs {layer.macs()} > "
            f"{budget * in_f * out_f}"
        )

    check()
    assert set(ran) == set(STRUCTURES)
    _record(ran)


# -- the forward pass --------------------------------------------------------------------------
def test_forward_is_the_dense_matrix_on_any_leading_shape():
    hyp, st = _hypothesis()
    ran = []

    @_settings(hyp, 120)
    @hyp.given(
        layer=_layer_strategy(st),
        lead=st.lists(st.integers(0, 3), min_size=0, max_size=3),
        bias=st.booleans(),
    )
    def check(layer, lead, bias):
        name, in_f, out_f, budget, seed = layer
        layer = _buildable(name, in_f, out_f, budget, seed)
        hyp.assume(layer is not None)
        ran.append(name)
        g = torch.Generator().manual_seed(seed)
        if bias:
            layer.bias = torch.nn.Parameter(torch.randn(out_f, generator=g,
                                                        dtype=torch.float64))
        else:
            layer.bias = None
        x = torch.randn(*lead, in_f, generator=g, dtype=torch.float64)
        with torch.no_grad():
            y = layer(x)
            want = x @ layer.to_dense().T
        if bias:
            want = want + layer.bias.detach()
        assert y.shape == (*lead, out_f)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)

    check()
    _record(ran)


def test_macs_are_what_the_forward_pass_computes():
    hyp, st = _hypothesis()
    ran = []

    @_settings(hyp, 100)
    @hyp.given(layer=_layer_strategy(st), tokens=st.integers(1, 6))
    def check(layer, tokens):
        name, in_f, out_f, budget, seed = layer
        layer = _buildable(name, in_f, out_f, budget, seed)
        hyp.assume(layer is not None)
        ran.append(name)
        layer.bias = None  # the bias is not counted
        x = torch.randn(tokens, in_f, dtype=torch.float64)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == 2 * tokens * layer.macs(), name

    check()
    _record(ran)


# -- GBLR with random widths and locations -----------------------------------------------------
def _random_gblr(st):
    return st.tuples(
        st.integers(1, 24), st.integers(1, 24), st.integers(1, 6), st.integers(1, 3),
        st.integers(0, 2**16), st.booleans(),
    )


def _gblr(in_f, out_f, k, r, seed, bias, dtype=torch.float64):
    r = min(r, in_f, out_f)
    torch.manual_seed(seed)
    layer = GBLRLinear(in_f, out_f, num_components=k, rank_per_component=r, init="random",
                       bias=bias).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # widths anywhere in [0, 1], with some components off and some at full width
        widths = torch.rand(layer.widths.shape, generator=g, dtype=dtype)
        widths[torch.rand(widths.shape, generator=g) < 0.2] = 0.0
        widths[torch.rand(widths.shape, generator=g) < 0.2] = 1.0
        layer.widths.copy_(widths)
        layer.locations.copy_(torch.rand(layer.locations.shape, generator=g, dtype=dtype))
        if bias:
            layer.bias.normal_(generator=g)
    return layer.eval()


def test_gblr_sharp_macs_equal_macs():
    hyp, st = _hypothesis()
    ran = []

    @_settings(hyp, 80)
    @hyp.given(spec=_random_gblr(st))
    def check(spec):
        layer = _gblr(*spec)
        ran.append(spec)
        assert layer.sigma is None
        assert layer.sharp_macs() == layer.macs()

    check()
    _record(ran)


def test_gblr_packed_form_is_the_layer():
    hyp, st = _hypothesis()
    ran = []

    @_settings(hyp, 60)
    @hyp.given(spec=_random_gblr(st), tokens=st.integers(1, 9),
               pack_for=st.sampled_from([1, 8, 64, (1, 16)]))
    def check(spec, tokens, pack_for):
        layer = _gblr(*spec)
        ran.append(spec)
        packed = layer.packed(tokens=pack_for)
        x = torch.randn(tokens, layer.in_features, dtype=torch.float64)
        with torch.inference_mode():
            want = layer(x)
            torch.testing.assert_close(packed(x), want, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(packed(x[:1]), want[:1], rtol=1e-9, atol=1e-9)
        # (values only: a packing without any weight, every component off, has no buffer
        # to take a dtype from, and its to_dense() comes back in float32)
        torch.testing.assert_close(packed.to_dense().double(), layer.to_dense().detach(),
                                   rtol=1e-9, atol=1e-9)

    check()
    _record(ran)
