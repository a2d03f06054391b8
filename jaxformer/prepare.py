"""`python -m jaxformer.prepare`: the entry point lives in jaxformer/cli/prepare.py."""

from jaxformer.cli.prepare import launch

if __name__ == "__main__":
    launch()
