"""Deployment: pack trained GBLR layers into fast, exact inference modules."""

from gblr.deploy.io import load_packed, save_packed
from gblr.deploy.model import DeployReport, deploy
from gblr.deploy.packed import PackedGBLRLinear, cyclic_band, group_bands

__all__ = [
    "deploy",
    "DeployReport",
    "PackedGBLRLinear",
    "cyclic_band",
    "group_bands",
    "save_packed",
    "load_packed",
]
