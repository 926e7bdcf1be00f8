"""Recipes: settings parsed from TOML, the model transforms they ask for, and the compiled
stages and pipeline they build."""
