"""Core rules, used by every other package and importing none of them.

- :mod:`gblr.core.validate` — argument checks shared by constructors and commands;
- :mod:`gblr.core.cost` — MACs per token of every structure;
- :mod:`gblr.core.budget` — what a budget is and the arithmetic on it;
- :mod:`gblr.core.boxes` — GBLR widths/locations to integer boxes, their sharp cost, and
  shrinking widths until a cost fits;
- :mod:`gblr.core.timemodel` — the modelled time of the GEMMs a deployed layer runs;
- :mod:`gblr.core.surgery` — finding and replacing submodules.

``gblr.cost`` re-exports the cost, budget and box names as one public namespace.
"""
