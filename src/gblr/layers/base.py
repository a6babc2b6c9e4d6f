"""The interface shared by every structured linear layer, and their registry."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from gblr.core.cost import dense_cost
from gblr.core.deprecation import FlopsAliases
from gblr.core.validate import check_positive

__all__ = [
    "StructuredLinear",
    "STRUCTURES",
    "register_structure",
    "get_structure",
    "check_matrix",
    "check_bias",
    "check_dense_args",
    "init_uniform_",
    "provide",
    "provider",
]

#: Structure name -> layer class (``"gblr"``, ``"lowrank"``, ``"monarch"``, ...).
STRUCTURES: dict[str, type[StructuredLinear]] = {}


def register_structure(name: str):
    """Class decorator that records a structured layer under ``name``."""

    def wrap(cls: type[StructuredLinear]) -> type[StructuredLinear]:
        if name in STRUCTURES:
            raise ValueError(f"structure {name!r} is already registered")
        cls.structure_name = name
        STRUCTURES[name] = cls
        return cls

    return wrap


#: What packages above ``layers`` provide to the layers' conveniences, so that ``layers``
#: imports nothing above it: name -> (providing package, function). ``gblr.projection``
#: provides ``"project_gblr"`` (``GBLRLinear.from_dense``), ``gblr.deploy`` provides
#: ``"packed"`` and ``"tiled"`` (``GBLRLinear.packed()`` / ``.tiled()``). ``import gblr``
#: imports both.
_PROVIDERS: dict[str, tuple[str, Callable[..., Any]]] = {}
_PROVIDED_BY = {"project_gblr": "gblr.projection", "packed": "gblr.deploy",
                "tiled": "gblr.deploy"}


def provide(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Record ``fn`` as the implementation of the convenience ``name`` (see ``_PROVIDERS``)."""
    if name not in _PROVIDED_BY:
        raise ValueError(f"unknown provided name {name!r}; known: {sorted(_PROVIDED_BY)}")
    _PROVIDERS[name] = (fn.__module__, fn)
    return fn


def provider(name: str) -> Callable[..., Any]:
    """The function recorded by :func:`provide` for ``name``."""
    try:
        return _PROVIDERS[name][1]
    except KeyError:
        raise RuntimeError(
            f"{name!r} is provided by {_PROVIDED_BY.get(name, 'a package above gblr.layers')}, "
            "which is not imported; import gblr first"
        ) from None


def get_structure(name: str) -> type[StructuredLinear]:
    """The layer class registered as ``name``; a clear error lists the known names."""
    try:
        return STRUCTURES[name]
    except KeyError:
        known = ", ".join(sorted(STRUCTURES))
        raise ValueError(f"unknown structure {name!r}; known structures: {known}") from None


def check_matrix(weight: torch.Tensor, name: str = "weight") -> torch.Tensor:
    """Validate a dense ``(out, in)`` matrix: 2-D, floating point, finite."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (out, in) matrix, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return weight


def check_bias(bias: torch.Tensor | None, out_features: int, name: str = "bias") -> None:
    """Validate an optional bias given to ``from_dense``: a finite ``(out_features,)`` tensor."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} must have shape ({out_features},), got {tuple(bias.shape)}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_dense_args(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """Validate the ``weight`` and ``bias`` given to ``from_dense``; ``(out, in)`` of ``weight``."""
    check_matrix(weight)
    out_features, in_features = weight.shape
    check_bias(bias, out_features)
    return out_features, in_features


def check_second_moment(
    second_moment: torch.Tensor | None, in_features: int
) -> torch.Tensor | None:
    """Validate the input second moment ``C (in, in)`` given to a data-aware ``from_dense``."""
    if second_moment is None:
        return None
    if not isinstance(second_moment, torch.Tensor):
        raise TypeError(
            f"second_moment must be a torch.Tensor, got {type(second_moment).__name__}"
        )
    if tuple(second_moment.shape) != (in_features, in_features):
        raise ValueError(
            f"second_moment must be ({in_features}, {in_features}) for in_features="
            f"{in_features}, got {tuple(second_moment.shape)}"
        )
    if not second_moment.is_floating_point() or not bool(torch.isfinite(second_moment).all()):
        raise ValueError("second_moment must be a finite floating-point matrix")
    return second_moment.detach().double()


def init_uniform_(tensor: torch.Tensor, fan_in: float) -> torch.Tensor:
    """Fill ``tensor`` uniformly in ``±1/sqrt(fan_in)``, as ``nn.Linear`` does for its weight
    (with ``a=sqrt(5)``) and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.init.uniform_(tensor, -bound, bound)


class StructuredLinear(FlopsAliases, nn.Module, ABC):
    """Base class of the structured ``nn.Linear`` replacements.

    Subclasses implement :meth:`_forward_2d` (on a ``(tokens, in)`` input),
    :meth:`to_dense`, :meth:`macs` and :meth:`from_dense`. The base class
    validates shapes, flattens leading dimensions and handles the bias.
    """

    structure_name: ClassVar[str] = "structured"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_positive("in_features", in_features)
        self.out_features = check_positive("out_features", out_features)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        """``W x`` (no bias) for ``x`` of shape ``(tokens, in)``."""

    @abstractmethod
    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` matrix this layer applies (bias excluded)."""

    @abstractmethod
    def macs(self) -> int:
        """MACs per token of the forward pass (bias excluded)."""

    @classmethod
    @abstractmethod
    def from_dense(
        cls, weight: torch.Tensor, budget: float, bias: torch.Tensor | None = None, **kwargs: Any
    ) -> StructuredLinear:
        """Project a dense ``(out, in)`` matrix onto this structure within ``budget``."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, budget: float, **kwargs: Any) -> StructuredLinear:
        """:meth:`from_dense` of an ``nn.Linear``'s weight and bias, on the linear's device."""
        bias = None if linear.bias is None else linear.bias.detach()
        new = cls.from_dense(linear.weight.detach(), budget, bias=bias, **kwargs)
        return new.to(linear.weight.device)

    # -- shared -------------------------------------------------------------------------------
    def reset_bias(self) -> None:
        """Initialise the bias as ``nn.Linear`` does."""
        if self.bias is not None:
            init_uniform_(self.bias, self.in_features)

    @torch.no_grad()
    def load_tensors(self, bias: torch.Tensor | None = None, **tensors: torch.Tensor) -> None:
        """Copy each of ``tensors`` into the parameter or buffer of that name, and ``bias``
        into the bias when given (the end of every ``from_dense``)."""
        for name, value in tensors.items():
            getattr(self, name).copy_(value)
        if bias is not None:
            self.bias.copy_(bias)

    def num_parameters(self) -> int:
        """Number of stored parameters, bias included."""
        return sum(p.numel() for p in self.parameters())

    def dense_macs(self) -> int:
        """MACs per token of the dense layer this one replaces."""
        return dense_cost(self.in_features, self.out_features)

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        """The GEMM calls of the forward pass as ``(batch, rows, cols)`` weights, for the time
        model (:func:`gblr.core.timemodel.predict_seconds`); one dense GEMM unless overridden.
        ``tokens`` matters only to forms that change with it (packed layers)."""
        return [(1, self.out_features, self.in_features)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        y = self._linear_2d(x.reshape(-1, self.in_features))
        return y.reshape(*lead, self.out_features)

    def _linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b`` for ``x`` of shape ``(tokens, in)``; override to fuse the bias."""
        y = self._forward_2d(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
