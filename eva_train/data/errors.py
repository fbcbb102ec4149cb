"""Errors raised by the data pipeline, each message naming the problem and the fix."""


class DataError(ValueError):
    """Bad data or a bad index: raised at start-up (check_index) or when too many samples fail."""
