"""Reports read from run directories (through jaxformer/runs.py), never from a model:
`compare.py` groups runs by what differs between their configs and pools their seeds."""
