"""Built-in recipes, shipped as `gsopt.recipes` (TOML files read with importlib.resources)."""
