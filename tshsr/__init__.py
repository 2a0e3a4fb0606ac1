"""tshsr: Two-stream Hierarchical Similarity Reasoning for image-text matching."""

from .config import TSHSRConfig
from .model import (
    CheckpointError,
    Encoding,
    ImageEncoding,
    TextEncoding,
    TSHSRModel,
    TSHSROutput,
)
from .processing import InvalidInputError, TSHSRProcessor, Vocabulary

__version__ = "0.1.0"

__all__ = [
    "TSHSRConfig",
    "TSHSRModel",
    "TSHSROutput",
    "Encoding",
    "ImageEncoding",
    "TextEncoding",
    "TSHSRProcessor",
    "Vocabulary",
    "CheckpointError",
    "InvalidInputError",
]
