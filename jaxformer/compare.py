"""`python -m jaxformer.compare`: the entry point lives in jaxformer/cli/compare.py."""

from jaxformer.cli.compare import launch

if __name__ == "__main__":
    launch()
