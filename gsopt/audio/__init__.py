"""The audio layer: reading files and the log-mel frontends."""
