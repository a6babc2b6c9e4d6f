"""Models with a ``linear`` switch on the layers the paper replaces: Mixer, ViT, GPT-2.

ResNet-18 needs a structured ``Conv2d`` and is not provided here.
"""

from gblr.models.factory import LINEAR_KINDS, make_linear, project_linears
from gblr.models.gpt import GPT, structure_gpt2
from gblr.models.mixer import MlpMixer
from gblr.models.patch import PatchEmbed
from gblr.models.vit import VIT_SIZES, VisionTransformer

__all__ = [
    "LINEAR_KINDS",
    "make_linear",
    "project_linears",
    "GPT",
    "structure_gpt2",
    "MlpMixer",
    "PatchEmbed",
    "VIT_SIZES",
    "VisionTransformer",
]
