"""The compression's masks.png: per-layer images of where the boxes lie."""

from __future__ import annotations

import torch
from torch import nn

from gblr import GBLRConv2d, GBLRLinear, LowRankLinear
from gblr.convert.plot import layer_image, plot_masks


def block_sparse_layer() -> tuple[GBLRLinear, torch.Tensor]:
    torch.manual_seed(0)
    weight = torch.randn(12, 16)
    keep = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    return GBLRLinear.from_block_sparse(weight, keep, (4, 4)).eval(), keep


def test_block_sparse_image_is_nonzero_exactly_on_the_kept_blocks():
    layer, keep = block_sparse_layer()
    drawn = layer_image(layer)
    assert drawn.image.shape == (12, 16)
    expected = keep.repeat_interleave(4, 0).repeat_interleave(4, 1)
    assert torch.equal(drawn.image != 0, expected)
    assert torch.equal(drawn.image[expected], torch.full((int(expected.sum()),), 4.0))
    assert drawn.full == 0 and drawn.active == 4 * int(keep.sum())


def test_full_width_components_are_left_out_and_counted():
    layer, keep = block_sparse_layer()
    u, v = torch.randn(12, 3), torch.randn(3, 16)
    low = GBLRLinear.from_low_rank(u, v)
    both = GBLRLinear._from_components(
        torch.cat([layer.U.detach(), low.U.detach()], 1),
        torch.cat([layer.V.detach(), low.V.detach()], 0),
        torch.cat([layer.widths.detach(), low.widths.detach()], 1),
        torch.cat([layer.locations.detach(), low.locations.detach()], 1), None).eval()
    drawn = layer_image(both)
    assert drawn.full == 3
    assert torch.equal(drawn.image, layer_image(layer).image)  # the boxes stay visible
    only_low = layer_image(low.eval())
    assert only_low.full == 3 and not bool(only_low.image.any())
    dense_like = layer_image(LowRankLinear(16, 12, rank=2).eval())
    assert dense_like.active is None and bool((dense_like.image == 1).all())


def test_plot_masks_writes_a_figure(tmp_path):
    layer, _ = block_sparse_layer()
    conv = GBLRConv2d(4, 6, 3, per_tap=True, init="random").eval()
    assert layer_image(conv).image.shape == (6, 9 * 4)
    low = GBLRLinear.from_low_rank(torch.randn(12, 2), torch.randn(2, 16)).eval()
    model = nn.Sequential(layer, nn.ReLU(), low, conv, LowRankLinear(16, 12, rank=2))
    path = plot_masks(model, tmp_path / "sub" / "masks.png", title="test")
    assert path.is_file() and path.stat().st_size > 1000
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:  # a real picture, several colours
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 20
