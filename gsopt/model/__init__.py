"""The model layer: configs and variants, the encoder, projector and model files (FMS-style),
the LoRA, checkpoint loading and tensor parallelism.

Importing it registers both families (`gsopt.model.family`) and their FMS architectures, so
`fms.models.get_model("granite_speech", "tiny")` works after `import gsopt.model`.
"""

from gsopt.model import granite_speech, granite_speech5  # noqa: F401  (registration)
