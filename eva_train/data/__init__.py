"""Data pipeline: Arrow index -> resumable sampler -> decode/crop/mask in workers -> batches."""

from eva_train.data.errors import DataError
from eva_train.data.monitor import BadSampleMonitor

__all__ = ["DataError", "BadSampleMonitor"]
