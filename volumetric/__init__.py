"""volumetric: whole-volume CT/MRI classification with softmax-free, sequence-normalized Transformers.

    from volumetric import VolumeTransformer, load_model, Predictor

``VolumeTransformer`` is the model (volumetric/models/vit3d.py); ``load_model("best.pt")`` gives a
trained checkpoint's model, class names and preprocessing; ``Predictor("best.pt")(scan)``
classifies a scan file, an array with its affine, or a TorchIO image (volumetric/inference.py).
The method is explained in docs/method.md.
"""

from volumetric.errors import ConfigError, VolumetricError
from volumetric.layers.seqnorm_kernel import seqnorm_attention
from volumetric.models.vit3d import VolumeTransformer
from volumetric.version import __version__

__all__ = [
    "ConfigError",
    "LoadedModel",
    "Prediction",
    "Predictor",
    "VolumeTransformer",
    "VolumetricError",
    "__version__",
    "load_model",
    "seqnorm_attention",
]

_INFERENCE = ("LoadedModel", "Prediction", "Predictor", "load_model")


def __getattr__(name: str):
    # inference pulls in TorchIO, the preprocessing and the relevance maps: imported on first use,
    # so that `import volumetric` for the model alone stays light
    if name in _INFERENCE:
        from volumetric import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'volumetric' has no attribute {name!r}")
