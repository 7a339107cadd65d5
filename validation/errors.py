"""The errors of exact patching and its results files (one module, so that every layer of
``validation`` can raise them without importing the others)."""


class PatchError(ValueError):
    """Bad arguments to exact patching."""


class ExecutorError(PatchError):
    """An executor cannot run: Ray missing, a cluster unreachable, all workers lost, a worker
    whose model or code differs from the driver's."""


class StoreError(ValueError):
    """A results file is unreadable, incomplete, or does not fit the request."""


class StoreMismatch(StoreError):
    """A results file was written for different arguments."""


class StoreLocked(StoreError):
    """Another process is writing the results file."""
