"""What the index builder left out and why: counts per reason and the first few paths of each.

Readers run in worker processes and return a list of (reason, path) pairs with their rows; the
builder merges them here in unit order, so the report is the same for any worker count.
"""

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field

Skip = tuple[str, str]  # (reason, path)

# reasons, worded for the summary line
DANGLING_SYMLINK = "dangling symlink"
MISSING = "missing file"
SYMLINK_LOOP = "symlink loop"
NOT_A_FILE = "not a regular file (FIFO, socket, device or folder)"
EMPTY = "empty file (0 bytes)"
NO_PERMISSION = "permission denied"
UNREADABLE = "unreadable"
TRUNCATED_MEMBER = "tar member runs past the end of the shard (truncated)"
CORRUPT_TAR = "corrupt tar data (members after it are lost)"
UNREADABLE_SHARD = "unreadable shard or parquet file"
BAD_LABEL = "unparseable .cls label (sample kept, label -1)"


def check_file(path: str) -> str | None:
    """None if `path` can be indexed as an image file, else the reason it cannot. One stat and one
    access call: no file is opened (opening a FIFO would block the builder)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return DANGLING_SYMLINK if os.path.islink(path) else MISSING
        if exc.errno == errno.ELOOP:
            return SYMLINK_LOOP
        return f"{UNREADABLE} ({exc.strerror})"
    if not stat.S_ISREG(info.st_mode):
        return NOT_A_FILE
    if info.st_size == 0:
        return EMPTY
    if not os.access(path, os.R_OK):
        return NO_PERMISSION
    return None


@dataclass
class SkipReport:
    max_examples: int = 3
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(path)

    def extend(self, skips: Iterable[Skip]) -> None:
        for reason, path in skips:
            self.add(reason, path)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """Multi-line text: one line per reason (most frequent first) with its first paths."""
        if not self.counts:
            return "skipped nothing"
        lines = [f"skipped {self.total} entries:"]
        for reason, count in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            more = ", ..." if count > len(self.examples[reason]) else ""
            lines.append(f"  {count:>8}  {reason}: {', '.join(self.examples[reason])}{more}")
        return "\n".join(lines)
