"""The `gsopt` commands, one module each."""
