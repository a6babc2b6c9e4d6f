"""Deprecated names kept for one release, each warning with its replacement."""

from __future__ import annotations

import warnings

__all__ = ["FlopsAliases", "warn_renamed"]


def warn_renamed(old: str, new: str) -> None:
    """Emit the ``DeprecationWarning`` of a renamed function, method or argument."""
    warnings.warn(f"{old} is deprecated and will be removed; use {new}", DeprecationWarning,
                  stacklevel=3)


class FlopsAliases:
    """``flops()`` and ``dense_flops()``: the old names of ``macs()`` and ``dense_macs()``
    (they always returned MACs per token, not FLOPs)."""

    def flops(self, *args, **kwargs) -> int:
        """Deprecated: MACs per token; use :meth:`macs`."""
        warn_renamed(f"{type(self).__name__}.flops()", "macs() (it returns MACs)")
        return self.macs(*args, **kwargs)

    def dense_flops(self) -> int:
        """Deprecated: the dense layer's MACs per token; use :meth:`dense_macs`."""
        warn_renamed(f"{type(self).__name__}.dense_flops()", "dense_macs()")
        return self.dense_macs()
