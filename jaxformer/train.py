"""`python -m jaxformer.train`: the entry point lives in jaxformer/cli/train.py."""

from jaxformer.cli.train import launch

if __name__ == "__main__":
    launch()
