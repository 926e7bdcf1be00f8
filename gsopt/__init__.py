"""gsopt: Granite Speech on IBM's Foundation Model Stack, made fast stage by stage."""

from gsopt import kv_cache as _kv_cache  # noqa: F401  (registers the static-cache attention op)
from gsopt.checkpoint import load_model
from gsopt.config import VARIANTS, GraniteSpeechConfig, get_variant
from gsopt.errors import GsoptError
from gsopt.model import GraniteSpeech

__all__ = [
    "VARIANTS",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "GsoptError",
    "get_variant",
    "load_model",
]
