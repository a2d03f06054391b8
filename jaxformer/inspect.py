"""`python -m jaxformer.inspect`: the entry point lives in jaxformer/cli/inspect.py."""

from jaxformer.cli.inspect import launch

if __name__ == "__main__":
    launch()
