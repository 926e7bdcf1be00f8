"""Measuring: interleaved timing and how far a lossy recipe moved the model."""
