"""jaxformer: Flax NNX transformers for ablation research, driven by Hydra configs.

From Python: `jaxformer.load_run(RUN_DIR)` (jaxformer/inference/api.py) gives a trained run's
model, tokenizer and config, with `generate` and `score`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # imported on first use: `python -m jaxformer.train` should not pay for jax at start-up
    if name == "load_run":
        from jaxformer.inference.api import load_run

        return load_run
    raise AttributeError(f"module 'jaxformer' has no attribute {name!r}")
