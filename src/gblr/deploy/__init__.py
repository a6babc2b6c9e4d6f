"""Deployment: pack trained GBLR layers into fast, exact inference modules."""

from gblr.deploy.bands import cyclic_band
from gblr.deploy.export import ExportReport, export_onnx, onnx_gemms
from gblr.deploy.io import load_packed, save_packed
from gblr.deploy.model import FORMS, DeployReport, deploy
from gblr.deploy.packed import PackedGBLRLinear
from gblr.deploy.planner import group_bands
from gblr.deploy.tiled import TiledGBLRLinear, triton_available
from gblr.layers.base import provide

# GBLRLinear.packed() / .tiled() reach these through the layers' provider table
provide("packed", PackedGBLRLinear.from_gblr)
provide("tiled", TiledGBLRLinear.from_gblr)

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
    "export_onnx",
    "onnx_gemms",
    "ExportReport",
]
