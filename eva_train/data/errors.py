"""Errors raised by the data pipeline, each message naming the problem and the fix."""

from eva_train.errors import ConfigError


class DataError(ConfigError):
    """Bad data or a bad index: raised at start-up (check_index) or when too many samples fail."""
