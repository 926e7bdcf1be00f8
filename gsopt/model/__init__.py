"""The model layer: configs and variants, the encoder, projector and model files (FMS-style),
the LoRA, checkpoint loading and tensor parallelism."""
