"""ResNet-18 whose 3x3 convolutions in the residual stages are GBLR convolutions (or dense)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gblr.core.budget import check_budget
from gblr.core.validate import check_positive
from gblr.layers.conv import GBLRConv2d

__all__ = ["ResNet18", "RESNET_LINEARS"]

#: ``linear`` values a ResNet accepts: the structured family has no convolution besides GBLR.
RESNET_LINEARS = ("dense", "gblr")


def _conv3x3(cin: int, cout: int, stride: int, linear: str, budget: float,
             gblr: dict[str, Any] | None) -> nn.Module:
    if linear == "dense":
        return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)

    opts = dict(gblr or {})
    opts.setdefault("init_fraction", budget)
    return GBLRConv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **opts)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, linear: str, budget: float,
                 gblr: dict[str, Any] | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, linear, budget, gblr)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout, 1, linear, budget, gblr)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016); ``linear="gblr"`` makes every 3x3 conv of the four residual
    stages a :class:`~gblr.layers.conv.GBLRConv2d` (one GBLR over ``out x 9*in``).

    The stem (7x7 conv, or 3x3 when ``small_input`` for 32x32 images), the 1x1 shortcuts and
    the head stay dense. ``width`` scales the channel counts (64 for the standard model).
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, width: int = 64,
                 small_input: bool = False, linear: str = "dense", budget: float = 1.0,
                 gblr: dict[str, Any] | None = None, img_size: Any = None) -> None:
        super().__init__()
        if linear not in RESNET_LINEARS:
            raise ValueError(f"ResNet18 supports linear in {RESNET_LINEARS}, got {linear!r}")
        budget = check_budget(budget)
        w = check_positive("width", width)
        self.linear = linear
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(w), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, cout, stride, linear, budget, gblr))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, check_positive("num_classes", num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
