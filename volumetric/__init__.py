"""volumetric: whole-volume CT/MRI classification with softmax-free, sequence-normalized Transformers."""

__version__ = "0.1.0"

from volumetric.errors import VolumetricError  # noqa: E402
from volumetric.layers.attention import seqnorm_attention  # noqa: E402
from volumetric.models.vit3d import VolumeTransformer  # noqa: E402

__all__ = ["VolumeTransformer", "VolumetricError", "seqnorm_attention", "__version__"]
