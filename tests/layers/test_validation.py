"""Argument checks of the layers that name the problem."""

from __future__ import annotations

import pytest

from gblr import GBLRConv2d, GBLRLinear


@pytest.mark.parametrize("arg, value", [
    ("stride", 1.5), ("stride", (1, 2.0)), ("stride", 2.0), ("padding", 0.5),
    ("padding", (1.0, 1)), ("dilation", 1.0), ("kernel_size", 3.0), ("stride", True),
    ("stride", (1, 1, 1)), ("stride", None), ("dilation", "2"),
])
def test_conv_refuses_non_integer_geometry(arg, value):
    kwargs = {"kernel_size": 3, arg: value}
    with pytest.raises(TypeError, match=arg):
        GBLRConv2d(4, 6, **kwargs)


def test_conv_refuses_a_padding_string_it_does_not_know():
    with pytest.raises(ValueError, match="padding"):
        GBLRConv2d(4, 6, kernel_size=3, padding="1")


def test_conv_output_size_refuses_float_sizes():
    conv = GBLRConv2d(4, 6, kernel_size=3)
    with pytest.raises(TypeError, match="input_hw"):
        conv.output_size((8.5, 8))
    assert conv.output_size((8, 8)) == (6, 6)


def test_rank_fraction_sets_the_total_rank():
    # K r = floor(fraction * min(in, out)), rounded down to whole components, at least one
    assert GBLRLinear(256, 1024, rank_fraction=0.5).num_components == 128
    assert GBLRLinear(256, 1024, rank_fraction=0.5, rank_per_component=4).num_components == 32
    assert GBLRLinear(10, 64, rank_fraction=0.5, rank_per_component=4).num_components == 1
    assert GBLRLinear(10, 64, rank_fraction=0.05).num_components == 1
    assert GBLRLinear(100, 200, rank_fraction=0.29).num_components == 29  # not 28.999...
    assert GBLRLinear(10, 64).num_components == GBLRLinear(10, 64, rank_fraction=1).num_components


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(rank_fraction=0.5, num_components=4), ValueError, "not both"),
    (dict(rank_fraction=0.0), ValueError, "rank_fraction"),
    (dict(rank_fraction=1.5), ValueError, "rank_fraction"),
    (dict(rank_fraction="half"), TypeError, "rank_fraction"),
])
def test_rank_fraction_refuses_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        GBLRLinear(8, 6, **kwargs)
