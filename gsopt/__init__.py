"""gsopt: Granite Speech on IBM's Foundation Model Stack, made fast stage by stage."""

import sys

try:
    from gsopt.engine import kv_cache as _kv_cache  # noqa: F401  (registers the static-cache attention ops)
    from gsopt.errors import GsoptError
    from gsopt.model.checkpoint import load_model
    from gsopt.model.config import VARIANTS, GraniteSpeechConfig, get_variant
    from gsopt.model.granite_speech import GraniteSpeech
except KeyboardInterrupt:
    # `python -m gsopt` interrupted while torch loads (argv[0] is "-m" until the module is
    # found): answer as the command line does later. A library import re-raises.
    if sys.argv[:1] == ["-m"]:
        print("gsopt: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise

__all__ = [
    "VARIANTS",
    "GraniteSpeech",
    "GraniteSpeechConfig",
    "GsoptError",
    "get_variant",
    "load_model",
]
