"""jaxformer: Flax NNX transformers for ablation research, driven by Hydra configs."""

__version__ = "0.1.0"
