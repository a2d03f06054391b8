"""`python -m jaxformer.embed`: the entry point lives in jaxformer/cli/embed.py."""

from jaxformer.cli.embed import launch

if __name__ == "__main__":
    launch()
