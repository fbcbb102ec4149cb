"""The two kinds of error a user sees as one line on stderr (pretrain.main prints them, rank 0 only).

ConfigError: the input is wrong (configuration, a file given on the command line, the data);
exit code 2, and the message names the problem and the fix. RunError: the run failed for a
reason outside the input (a full disk, ...); exit code 1, the message names what and where.
Anything else is a bug and keeps its traceback.
"""

import errno
import os
from pathlib import Path


class ConfigError(ValueError):
    """A configuration or input problem, with the fix in the message (exit code 2)."""

    exit_code = 2


class RunError(RuntimeError):
    """A run-time failure that is not a bug in the code: one line naming what and where (exit code 1)."""

    exit_code = 1


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save reports a failed write without its errno (e.g. "[enforce fail at inline_container.cc:672]
# unexpected pos", "PytorchStreamWriter failed writing file"): such a failure is probed, not trusted.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter failed", "file write failed", "unexpected pos")


def disk_full_error(error: BaseException, path: os.PathLike) -> RunError | None:
    """A RunError saying "No space left on device" with the path, when `error` (raised while writing
    under `path`) came from a full disk or an exhausted quota; None for anything else."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        reason, where = error.strerror or os.strerror(error.errno), error.filename or path
    elif isinstance(error, RuntimeError) and any(s in str(error) for s in TORCH_WRITE_FAILURES):
        reason, where = _probe_write(Path(path)), path
        if reason is None:
            return None
    else:
        return None
    return RunError(
        f"{reason} while writing {where}; free space there or point train.output_dir "
        f"elsewhere, then resume (the last complete checkpoint is intact)"
    )


def _probe_write(path: Path) -> str | None:
    """Write 1 MiB next to `path`: the errno's text when that fails for lack of space, else None."""
    folder = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    probe = folder / f".space-probe-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno in DISK_FULL_ERRNOS else None
    finally:
        probe.unlink(missing_ok=True)
