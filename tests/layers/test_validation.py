"""Argument checks of the layers that name the problem."""

from __future__ import annotations

import pytest

from gblr import GBLRConv2d


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
