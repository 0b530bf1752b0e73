"""xcodec2-jax: the X-Codec2 speech codec in JAX/Flax NNX, numerically matched to Hugging Face Transformers."""

from .config import SemanticConfig, Xcodec2Config
from .errors import AudioError, CheckpointError, CheckpointNotFoundError, CodesError, ConfigError, Xcodec2Error
from .features import Xcodec2FeatureExtractor
from .model import Xcodec2DecoderOutput, Xcodec2EncoderOutput, Xcodec2Model, Xcodec2Output

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CodesError",
    "ConfigError",
    "SemanticConfig",
    "Xcodec2Config",
    "Xcodec2DecoderOutput",
    "Xcodec2EncoderOutput",
    "Xcodec2Error",
    "Xcodec2FeatureExtractor",
    "Xcodec2Model",
    "Xcodec2Output",
]
