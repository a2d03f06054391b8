"""The one user-error type. Config checks, tasks, data, checkpoints and the entry points' own
settings raise `UserError` with one line naming what is wrong (the key, path or value) and how to
fix it; the entry points print it as `error: ...` and exit with code 2 (jaxformer/cli/app.py).
A `UserError` that wraps a lower-level error is raised `from` it, so a traceback, when one is
wanted, still shows the cause."""


class UserError(ValueError):
    """A bad input (config value, path, file, checkpoint, data); the message is one line."""
