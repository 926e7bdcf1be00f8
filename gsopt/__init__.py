"""gsopt: Granite Speech on IBM's Foundation Model Stack, made fast stage by stage."""

from gsopt.config import VARIANTS, GraniteSpeechConfig, get_variant
from gsopt.errors import GsoptError

__all__ = ["VARIANTS", "GraniteSpeechConfig", "GsoptError", "get_variant"]
