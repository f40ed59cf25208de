"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class PruneLabError(Exception):
    """Bad input or an unmet precondition the user can fix (not a bug)."""


class UnsupportedArchitecture(PruneLabError):
    pass


class DataUnavailable(PruneLabError):
    pass


class BudgetError(PruneLabError):
    pass


class CheckpointError(PruneLabError):
    pass
