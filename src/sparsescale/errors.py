"""One exception type for bad input: the CLI turns it into one clear message and exit code 2.

Messages name the bad value and the fix, e.g.
``sparsity must be in [0, 1): got 1.2 (config/default.yaml: sweep.sparsity)``.
"""


class UserError(ValueError):
    """Bad input from a user (config, arguments, files). Printed without a traceback."""


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss: the run stops with this message and a non-zero exit (3)."""
