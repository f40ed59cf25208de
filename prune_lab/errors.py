"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class PruneLabError(Exception):
    """Bad input or an unmet precondition the user can fix (not a bug)."""


class UnsupportedArchitecture(PruneLabError):
    pass


class DataUnavailable(PruneLabError):
    pass


class BudgetError(PruneLabError):
    """The allocation cannot meet its budget. `shortfall`: the fraction of the budget left unmet
    (studies report it as the constraint violation of an infeasible trial)."""

    def __init__(self, message: str, shortfall: float | None = None):
        super().__init__(message)
        self.shortfall = shortfall


class CheckpointError(PruneLabError):
    pass


class DiskFull(PruneLabError, OSError):
    """A write ran out of space (ENOSPC, EDQUOT): one line naming where. An OSError too, so the writers
    that go on without an optional file (the score cache) still catch it."""

    def __init__(self, path):
        import errno
        super().__init__(errno.ENOSPC, f"no space left on {path}")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM) raised in the main thread, so the job ends as for Ctrl-C."""

    def __init__(self, signum: int):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
