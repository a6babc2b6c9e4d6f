"""Deployment: pack trained GBLR layers into fast, exact inference modules."""

from gblr.deploy.io import load_packed, save_packed
from gblr.deploy.model import FORMS, DeployReport, deploy
from gblr.deploy.packed import PackedGBLRLinear, cyclic_band, group_bands
from gblr.deploy.tiled import TiledGBLRLinear, triton_available

__all__ = [
    "deploy",
    "DeployReport",
    "PackedGBLRLinear",
    "TiledGBLRLinear",
    "triton_available",
    "FORMS",
    "cyclic_band",
    "group_bands",
    "save_packed",
    "load_packed",
]
