"""Transcription for users: the Python API and corpus runs."""
