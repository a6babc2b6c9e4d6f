"""The GBLR layer: a sum of low-rank components, each confined to a learned box.

``W = sum_c diag(m_out_c) U_c V_c diag(m_in_c)`` where ``m_in_c`` and
``m_out_c`` are Gaudi masks whose widths and locations are trainable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gblr.core import boxes
from gblr.core.boxes import INPUT_AXIS, OUTPUT_AXIS
from gblr.core.budget import check_budget
from gblr.core.cost import grouped_component_cost
from gblr.core.deprecation import warn_renamed
from gblr.core.validate import check_fraction, check_positive
from gblr.layers.base import StructuredLinear, provider, register_structure
from gblr.layers.blocks import truncated_svd_factors
from gblr.layers.gblr_exact import ExactForms
from gblr.ops.costed import costed_linear
from gblr.ops.factors import grid_masked_factors
from gblr.ops.gaudi import EVAL_MASK_THRESHOLD, gaudi_mask, round_to_grid

__all__ = [
    "GBLRLinear", "INIT_SCHEMES", "LOCATION_INITS", "FORWARD_PATHS", "STRUCTURE_PARAMETERS",
    "sharp_macs_of",
]

INIT_SCHEMES = ("svd", "lowrank", "sparse_lowrank", "random")
LOCATION_INITS = ("even", "constant", "random")
FORWARD_PATHS = ("auto", "dense", "lowrank")


#: The structure parameters of a GBLR layer, kept in float32/float64 whatever its dtype.
STRUCTURE_PARAMETERS = ("widths", "locations")
_STRUCTURE_DTYPES = (torch.float32, torch.float64)


def _structure_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of widths and locations for a layer of ``dtype``: float64 stays, anything
    else (16-bit floats, the default) is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_path(value: str) -> str:
    """Validate a forward path setting (one of :data:`FORWARD_PATHS`)."""
    if value not in FORWARD_PATHS:
        raise ValueError(f"path must be one of {FORWARD_PATHS}, got {value!r}")
    return value


@register_structure("gblr")
class GBLRLinear(ExactForms, StructuredLinear):
    """Generalized Block Low-Rank drop-in replacement for ``nn.Linear``.

    Args:
        in_features, out_features: sizes, as for ``nn.Linear``.
        num_components: number of components ``K``; default
            ``floor(rank_fraction * min(in, out)) // rank_per_component`` (at least 1).
        rank_per_component: rank ``r`` of each component.
        rank_fraction: the total rank ``K r`` as a fraction of ``min(in, out)``, in
            ``(0, 1]``, when ``num_components`` is not given (default 1: the paper's ``K``).
            Below 1 the training step is cheaper: the masks are ``K x n`` and the factors'
            GEMMs scale with ``K r`` (see docs/training.md).
        bias: learn an additive bias.
        sigma: Gaussian low-pass of the masks (None: sharp boxes).
        init: ``"svd"`` (all widths 1, factors from the SVD of a dense init), ``"lowrank"``
            (enough full-width components to take ``init_fraction`` of the dense cost, the rest
            off but able to regrow), ``"sparse_lowrank"`` (half of ``init_fraction`` in
            full-width components, half in short ones)
            or ``"random"`` (all widths 1, random factors; allows any ``K``).
        init_fraction: share of the dense cost the ``"lowrank"`` and ``"sparse_lowrank"`` inits
            start at (not a budget: nothing enforces it later). ``budget=`` is its deprecated
            old name.
        location_init: ``"even"``, ``"constant"`` (all 0) or ``"random"``.
        path: forward path, ``"dense"`` (build W, then ``F.linear``), ``"lowrank"``
            (``x -> (x V_m^T) U_m^T``) or ``"auto"`` (whichever needs fewer MACs).

    ``widths`` and ``locations`` are ``(2, K)`` fractions, row 0 the input axis and row 1
    the output axis. In the forward pass both are rounded to the index grid with a
    straight-through gradient. In evaluation mode a component at most one index wide on
    either axis is off and mask entries below ``1e-3`` are zero; :meth:`macs` always
    reports this evaluation-mode cost.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_components: int | None = None,
        rank_per_component: int = 1,
        rank_fraction: float | None = None,
        bias: bool = True,
        sigma: float | None = None,
        init: str = "svd",
        init_fraction: float | None = None,
        location_init: str = "even",
        path: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        budget: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if budget is not None:
            warn_renamed("GBLRLinear(budget=)", "init_fraction= (the initial share of the cost)")
            if init_fraction is not None:
                raise ValueError("pass init_fraction= only (budget= is its deprecated name)")
            init_fraction = budget
        r = check_positive("rank_per_component", rank_per_component)
        min_dim = min(self.in_features, self.out_features)
        if r > min_dim:
            raise ValueError(
                f"rank_per_component={r} exceeds min(in_features, out_features)={min_dim}"
            )
        if num_components is not None and rank_fraction is not None:
            raise ValueError("pass num_components or rank_fraction, not both")
        if num_components is None:
            fraction = 1.0 if rank_fraction is None else check_fraction(
                "rank_fraction", rank_fraction, "a fraction of min(in_features, out_features)")
            # the floor of fraction * min_dim, safe from rounding (0.29 * 100 = 28.999...)
            k = max(1, math.floor(fraction * min_dim + 1e-9) // r)
        else:
            k = check_positive("num_components", num_components)
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        if init != "random" and k * r > min_dim:
            raise ValueError(
                f"num_components * rank_per_component = {k * r} exceeds "
                f"min(in_features, out_features) = {min_dim}, the rank that init={init!r} "
                "can fill; use fewer components or init='random'"
            )
        if location_init not in LOCATION_INITS:
            raise ValueError(
                f"location_init must be one of {LOCATION_INITS}, got {location_init!r}"
            )
        if init in ("lowrank", "sparse_lowrank"):
            if init_fraction is None:
                raise ValueError(f"init={init!r} needs init_fraction")
            check_budget(init_fraction, "init_fraction")
        self.num_components = k
        self.rank_per_component = r
        self.init = init
        self.init_fraction = init_fraction
        self.location_init = location_init
        self.path = path
        self.sigma = sigma
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(self.out_features, k * r, **factory))
        self.V = nn.Parameter(torch.empty(k * r, self.in_features, **factory))
        structure = {"device": device, "dtype": _structure_dtype(dtype)}
        self.widths = nn.Parameter(torch.empty(2, k, **structure))
        self.locations = nn.Parameter(torch.empty(2, k, **structure))
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``...: widths and locations follow the device but
        keep float32 or float64 (the boxes are exact integers of the index grid; a 16-bit
        float would move them, as normalisation statistics are kept in float32 under mixed
        precision)."""
        kept = {name: getattr(self, name).data for name in STRUCTURE_PARAMETERS}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            param = getattr(self, name)
            if param.dtype not in _STRUCTURE_DTYPES:
                param.data = old.to(device=param.device, dtype=_structure_dtype(old.dtype))
                if param.grad is not None:
                    param.grad = param.grad.to(param.dtype)
        return self

    # -- settings ------------------------------------------------------------------------------
    @property
    def sigma(self) -> float | None:
        """Width of the Gaussian low-pass on the masks (None: sharp boxes)."""
        return self._sigma

    @sigma.setter
    def sigma(self, value: float | None) -> None:
        if value is not None and not (float(value) > 0 and math.isfinite(float(value))):
            raise ValueError(f"sigma must be a positive number or None, got {value!r}")
        self._sigma = None if value is None else float(value)

    @property
    def path(self) -> str:
        """Forward path: ``"auto"``, ``"dense"`` or ``"lowrank"``."""
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        self._path = _check_path(value)

    # -- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise factors, widths, locations and bias following ``init``/``location_init``."""
        k, r = self.num_components, self.rank_per_component
        dense = torch.empty(self.out_features, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        if self.init == "random":
            std = (1.0 / (3.0 * self.in_features * k * r)) ** 0.25
            self.U.normal_(0.0, std)
            self.V.normal_(0.0, std)
        else:
            u, v = truncated_svd_factors(dense, k * r)
            self.U.copy_(u)
            self.V.copy_(v)
        self.widths.copy_(self._initial_widths())
        self.locations.copy_(self._initial_locations())
        self.reset_bias()

    def _initial_widths(self) -> torch.Tensor:
        k, r = self.num_components, self.rank_per_component
        n_in, n_out = self.in_features, self.out_features
        widths = torch.ones(2, k)
        if self.init in ("svd", "random"):
            return widths
        limit = self.init_fraction * n_in * n_out
        full_share = limit if self.init == "lowrank" else limit / 2
        n_full = min(k, int(full_share // (r * (n_in + n_out))))
        # an off component is closed on the output axis only: with both axes at width 0 the
        # loss is flat in both widths (each mask's gradient carries the other mask as a
        # factor), so it could never regrow; an open input axis costs nothing in evaluation
        # (the component is inactive) and gives the output width a gradient
        widths[OUTPUT_AXIS, n_full:] = 0.0
        if self.init == "sparse_lowrank" and n_full < k:
            # remaining half of the budget split evenly over the short components
            n_short = k - n_full
            frac = (limit - n_full * r * (n_in + n_out)) / (n_short * r * (n_in + n_out))
            widths[:, n_full:] = min(1.0, max(frac, 0.0))
        return widths

    def _initial_locations(self) -> torch.Tensor:
        k = self.num_components
        if self.location_init == "constant":
            return torch.zeros(2, k)
        if self.location_init == "random":
            return torch.rand(2, k)
        return (torch.arange(k, dtype=torch.float32) / k).expand(2, k).clone()

    # -- masks ---------------------------------------------------------------------------------
    def _axis_mask(self, axis: int, n: int, index: torch.Tensor | None = None) -> torch.Tensor:
        width, location = self.widths[axis], self.locations[axis]
        if index is not None:
            width, location = width[index], location[index]
        width = round_to_grid(width.clamp(0.0, 1.0), n)
        location = round_to_grid(torch.remainder(location, 1.0), n)
        return gaudi_mask(width, location, n, self.sigma, check=False, on_grid=True)

    def active_components(self) -> torch.Tensor:
        """Boolean ``(K,)``: components more than one index wide on both axes (evaluation rule)."""
        return boxes.active(self.widths, self.in_features, self.out_features)

    def sharp_macs(self, widths: torch.Tensor | None = None) -> int:
        """Evaluation-mode MACs per token with sharp masks (``sigma=None``), read from the
        integer boxes in O(K) (:func:`gblr.core.boxes.sharp_cost`); equals :meth:`macs`
        when ``sigma`` is None. ``widths`` replaces the layer's own (a candidate shrink)."""
        return boxes.sharp_cost(
            self.widths if widths is None else widths, self.locations, self.in_features,
            self.out_features, self.rank_per_component,
        )

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(m_in (K, in), m_out (K, out))`` as the forward pass uses them in the current mode."""
        return self._masks_of(None)

    def _masks_of(
        self, index: torch.Tensor | None, active_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`masks` of the components ``index`` only (all when None); ``active_only``:
        the caller chose only active components, so none needs switching off."""
        m_in = self._axis_mask(INPUT_AXIS, self.in_features, index)
        m_out = self._axis_mask(OUTPUT_AXIS, self.out_features, index)
        if not self.training and (self.sigma is not None or torch.is_grad_enabled()):
            # the evaluation threshold: it zeroes blurred masks' tails, and, on sharp masks
            # (exact 0/1 boxes already), stops gradients from the indices outside the box
            m_in = torch.where(m_in.abs() < EVAL_MASK_THRESHOLD, 0.0, m_in)
            m_out = torch.where(m_out.abs() < EVAL_MASK_THRESHOLD, 0.0, m_out)
        if (not self.training or self.sigma is None) and not active_only:
            # evaluation, and sharp training, which computes what evaluation computes: a
            # component at most one index wide on an axis is off
            on = self.active_components()
            on = (on if index is None else on[index]).to(m_in.dtype)[:, None]
            m_in, m_out = m_in * on, m_out * on
        return m_in, m_out

    @torch.no_grad()
    def eval_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation-mode masks, whatever the current mode."""
        was_training = self.training
        self.train(False)
        try:
            return self.masks()
        finally:
            self.train(was_training)

    def masked_factors(self, live_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``U_m (out, K r)`` and ``V_m (K r, in)``, current-mode masks applied: ``W = U_m V_m``.

        With ``live_only`` the components whose masks are zero on both axes are left out
        (``K`` shrinks): they add nothing to ``W`` and, since each mask's gradient is
        weighted by the other mask, they get no gradient either, so the forward and
        backward passes are unchanged while skipping their work.
        """
        u, v = self.U, self.V
        r = self.rank_per_component
        index = None
        active_only = False
        if live_only and not torch.compiler.is_compiling():
            # which components are off is known from the widths alone, so their masks are
            # not even built: with sharp masks and in evaluation, those at most one index
            # wide on an axis; with a low-pass, those of width 0 on both axes
            active_only = self.sigma is None or not self.training
            if active_only:
                live = self.active_components()
            else:
                live = boxes.nonempty(self.widths, self.in_features, self.out_features)
            if not bool(live.all()):
                index = live.nonzero().squeeze(1)
        if index is not None:
            cols = (index[:, None] * r + torch.arange(r, device=index.device)).flatten()
            u, v = u.index_select(1, cols), v.index_select(0, cols)  # backward: an index_add
        if self.training and live_only and (active_only or self.sigma is not None):
            # training on live components only: masks and products in one operation
            widths, locations = self.widths, self.locations
            if index is not None:
                widths, locations = widths.index_select(1, index), locations.index_select(1, index)
            return grid_masked_factors(u, v, widths, locations, self.sigma, r)
        m_in, m_out = self._masks_of(index, active_only)
        if r > 1:
            m_in = m_in.repeat_interleave(r, dim=0)
            m_out = m_out.repeat_interleave(r, dim=0)
        return u * m_out.t().to(u.dtype), v * m_in.to(v.dtype)

    # -- the interface -------------------------------------------------------------------------
    def _choose_path(self, tokens: int, kr: int | None = None) -> str:
        if self.path != "auto":
            return self.path
        if kr is None:
            kr = self.num_components * self.rank_per_component
        n_in, n_out = self.in_features, self.out_features
        lowrank_macs = tokens * kr * (n_in + n_out)
        dense_macs = kr * n_in * n_out + tokens * n_in * n_out
        return "lowrank" if lowrank_macs <= dense_macs else "dense"

    def _apply_2d(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        u, v = self.masked_factors(live_only=True)
        dense = self._choose_path(x.shape[0], u.shape[1]) == "dense"
        if not self.training:
            # evaluation: an op that FlopCounterMode counts at the layer's cost (macs())
            y = costed_linear(x, u, v, self.macs(), dense)
            return y if bias is None else y + bias.to(y.dtype)
        if dense:
            return F.linear(x, u @ v, bias)
        return F.linear(F.linear(x, v), u, bias)

    def _forward_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_2d(x, None)

    def _linear_2d(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_2d(x, self.bias)

    def to_dense(self) -> torch.Tensor:
        """The ``(out, in)`` matrix applied in the current mode."""
        u, v = self.masked_factors()
        return u @ v

    def component_supports(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean evaluation-mode supports ``(K, in)`` and ``(K, out)`` of every component."""
        m_in, m_out = self.eval_masks()
        return m_in != 0, m_out != 0

    def _cost_key(self) -> tuple | None:
        """Changes whenever the evaluation-mode cost may change (in-place updates included);
        None for inference tensors (made under ``torch.inference_mode()``), which have no
        version counter: their cost is not cached."""
        w, l = self.widths, self.locations
        if w.is_inference() or l.is_inference():
            return None
        return (
            w._version, l._version, w.data_ptr(), l.data_ptr(), w.device, w.dtype, self.sigma
        )

    def macs(self) -> int:
        """Evaluation-mode MACs per token: components with identical boxes cost one block.

        Cached until ``widths``, ``locations`` or ``sigma`` change.
        """
        key = self._cost_key()
        cached = self.__dict__.get("_cost_cache")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        in_support, out_support = self.component_supports()
        ranks = torch.full((self.num_components,), self.rank_per_component, dtype=torch.long)
        cost = grouped_component_cost(in_support, out_support, ranks)
        if key is not None:
            self.__dict__["_cost_cache"] = (key, cost)
        return cost

    def gemms(self, tokens: int | None = None) -> list[tuple[int, int, int]]:
        """The evaluation-mode forward's two GEMMs over the active components' ranks (the
        unpacked low-rank path); the packed form has its own (``PackedGBLRLinear.gemms``)."""
        kr = int(self.active_components().sum()) * self.rank_per_component
        return [(1, kr, self.in_features), (1, self.out_features, kr)]

    def packed(
        self, tokens: int | tuple[int, ...] = 64, dtype: torch.dtype | None = None,
        tune: bool = False, **time_model: float,
    ):
        """Frozen inference form computing only the bands: a ``PackedGBLRLinear``.

        ``tokens``: the tokens per call the grouping is tuned for (see ``gblr.deploy``);
        ``tune``: time candidate packings on this device and keep the fastest;
        ``memory_tokens``, ``overhead``, ``io``: the time model to plan with (default: the
        device's, see ``gblr.core.timemodel``).
        """
        return provider("packed")(self, tokens=tokens, dtype=dtype, tune=tune, **time_model)

    def tiled(self, rank_tile: int = 16, in_tile: int = 64, out_tile: int = 64,
              dtype: torch.dtype | None = None):
        """Frozen inference form as two block-sparse GEMMs: a ``TiledGBLRLinear`` (one
        Triton kernel per stage on CUDA; tile sizes are powers of two >= 16)."""
        return provider("tiled")(self, rank_tile, in_tile, out_tile, dtype=dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_components={self.num_components}, "
            f"rank_per_component={self.rank_per_component}, sigma={self.sigma}, path={self.path!r}"
        )

    # -- exact constructors --------------------------------------------------------------------
    @classmethod
    def _from_components(
        cls,
        u: torch.Tensor,
        v: torch.Tensor,
        widths: torch.Tensor,
        locations: torch.Tensor,
        bias: torch.Tensor | None,
        rank_per_component: int = 1,
        **kwargs: Any,
    ) -> GBLRLinear:
        out_features, kr = u.shape
        in_features = v.shape[1]
        k = kr // rank_per_component
        layer = cls(
            in_features,
            out_features,
            num_components=k,
            rank_per_component=rank_per_component,
            bias=bias is not None,
            init="random",
            device=u.device,
            dtype=u.dtype,
            **kwargs,
        )
        layer.load_tensors(bias, U=u, V=v, widths=widths, locations=locations)
        layer.init = "svd"
        return layer

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        budget: float,
        bias: torch.Tensor | None = None,
        *,
        rank_per_component: int = 1,
        steps: int | None = None,
        calibration: Any = None,
        second_moment: torch.Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        sigma: float | None = None,
        path: str = "auto",
        **opts: Any,
    ) -> GBLRLinear:
        """Project a dense ``(out, in)`` matrix onto GBLR with ``gblr.project``.

        The result's evaluation-mode ``macs()`` is at most ``budget * in * out`` and its
        error is never above the truncated SVD's at that budget. ``steps=0`` returns the
        truncated-SVD start itself: ``min(in, out) // rank_per_component`` components, those
        that fit the budget at full width and the others off (width 0; they can regrow
        while a low-pass ``sigma`` is set, but with sharp masks an off component gets no
        gradient, and the forward pass skips it).
        ``calibration`` is inputs ``X (N, in)`` or a ``gblr.Calibration``; a second moment
        ``C = X^T X / N`` goes in ``second_moment=``. ``sigma`` and ``path`` are set on the
        returned layer; ``**opts`` are search settings (``gblr.projection.SearchOptions``).
        """
        layer = provider("project_gblr")(
            weight, budget, bias=bias, rank_per_component=rank_per_component, steps=steps,
            calibration=calibration, second_moment=second_moment, device=device,
            progress=progress, **opts,
        )
        layer.sigma = sigma
        layer.path = path
        return layer


def sharp_macs_of(layers: Sequence[GBLRLinear]) -> list[int]:
    """:meth:`GBLRLinear.sharp_macs` of each layer, computed in one pass
    (:func:`gblr.core.boxes.sharp_costs`) at about the cost of one layer's. It applies
    the rule of ``GBLRLinear.sharp_macs`` itself, not a subclass's override of it."""
    return boxes.sharp_costs([layer.widths for layer in layers],
                             [layer.locations for layer in layers],
                             [layer.in_features for layer in layers],
                             [layer.out_features for layer in layers],
                             [layer.rank_per_component for layer in layers])
