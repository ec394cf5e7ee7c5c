"""Built-in scenario definitions (TOML), loaded with importlib.resources."""
