"""`python -m jaxformer.evaluate`: the entry point lives in jaxformer/cli/evaluate.py."""

from jaxformer.cli.evaluate import launch

if __name__ == "__main__":
    launch()
