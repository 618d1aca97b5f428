"""The pruning driver's input errors (both ValueError: the CLI turns them into one line and exit 2)."""


class UnsupportedModelError(ValueError):
    """The model's decoder blocks cannot be found (or its forward never reaches them)."""


class PrunerOptionError(ValueError):
    """An option of prune_model that cannot work: unknown method, missing calibration data, bad regex, ..."""
