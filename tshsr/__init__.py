"""tshsr: Two-stream Hierarchical Similarity Reasoning for image-text matching."""

from .config import TSHSRConfig
from .encoding import Encoding, ImageEncoding, TextEncoding
from .hub import CheckpointError
from .model import TSHSRModel
from .processing import InvalidInputError, TSHSRProcessor, Vocabulary
from .registry import get_head, register_head
from .scoring import TSHSROutput, TSHSRPairOutput

__version__ = "0.1.0"

__all__ = [
    "TSHSRConfig",
    "TSHSRModel",
    "TSHSROutput",
    "TSHSRPairOutput",
    "Encoding",
    "ImageEncoding",
    "TextEncoding",
    "TSHSRProcessor",
    "Vocabulary",
    "CheckpointError",
    "InvalidInputError",
    "register_head",
    "get_head",
]
