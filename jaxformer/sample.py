"""`python -m jaxformer.sample`: the entry point lives in jaxformer/cli/sample.py."""

from jaxformer.cli.sample import launch

if __name__ == "__main__":
    launch()
