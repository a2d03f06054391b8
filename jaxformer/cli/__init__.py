"""The Hydra entry points (`python -m jaxformer.train`, `.sample`, `.evaluate`, `.embed`,
`.inspect`): each parses its config, calls the library and prints; app.py holds what they share."""
