"""The one error of the architecture adapter."""

class UnsupportedModel(NotImplementedError):
    """The architecture adapter does not implement a feature of this model (named in the message)."""
