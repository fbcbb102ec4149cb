"""Running count of replaced (bad) samples; aborts the run when their fraction passes a threshold."""

from eva_train.data.errors import DataError


class BadSampleMonitor:
    def __init__(self, threshold: float = 0.01, min_samples: int = 1000, bad_samples: int = 0, seen_samples: int = 0):
        """`bad_samples` / `seen_samples`: the counts so far of the run being resumed."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"bad sample threshold {threshold} must lie in [0, 1]")
        self.threshold, self.min_samples = threshold, min_samples
        self.bad_samples, self.seen_samples = bad_samples, seen_samples

    @property
    def fraction(self) -> float:
        return self.bad_samples / max(1, self.seen_samples)

    def update(self, batch_bad_count: int, batch_size: int) -> None:
        """Add one batch (`batch["bad"].sum()`, its size); raises DataError past the threshold."""
        self.bad_samples += int(batch_bad_count)
        self.seen_samples += int(batch_size)
        if self.seen_samples >= self.min_samples and self.fraction > self.threshold:
            raise DataError(
                f"{self.bad_samples} of {self.seen_samples} samples ({self.fraction:.2%}) failed to read or decode, "
                f"above data.bad_sample_threshold={self.threshold:.2%}; the worker logs name each bad file: fix or "
                f"drop them and rebuild the index, or raise the limit with --data.bad_sample_threshold=X"
            )
