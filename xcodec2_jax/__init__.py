"""xcodec2-jax: the X-Codec2 speech codec in JAX/Flax NNX, numerically matched to Hugging Face Transformers."""

from .config import ConfigError, SemanticConfig, Xcodec2Config
from .features import Xcodec2FeatureExtractor
from .hub import CheckpointNotFoundError
from .model import Xcodec2DecoderOutput, Xcodec2EncoderOutput, Xcodec2Model, Xcodec2Output
from .weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "SemanticConfig",
    "Xcodec2Config",
    "Xcodec2DecoderOutput",
    "Xcodec2EncoderOutput",
    "Xcodec2FeatureExtractor",
    "Xcodec2Model",
    "Xcodec2Output",
]
