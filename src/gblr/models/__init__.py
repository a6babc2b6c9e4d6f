"""Models with a ``linear`` switch on the layers the paper replaces (Mixer, ViT, GPT-2, ResNet)."""

from gblr.models.factory import LINEAR_KINDS, make_linear, project_linears
from gblr.models.gpt import GPT, structure_gpt2
from gblr.models.mixer import MlpMixer
from gblr.models.patch import PatchEmbed
from gblr.models.resnet import RESNET_LINEARS, ResNet18
from gblr.models.vit import VIT_SIZES, VisionTransformer

__all__ = [
    "LINEAR_KINDS",
    "make_linear",
    "project_linears",
    "GPT",
    "structure_gpt2",
    "MlpMixer",
    "PatchEmbed",
    "RESNET_LINEARS",
    "ResNet18",
    "VIT_SIZES",
    "VisionTransformer",
]
