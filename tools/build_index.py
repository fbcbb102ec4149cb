"""Build an eva-train sample index (Arrow IPC) from image folders, tar shards and parquet files.

  python tools/build_index.py SOURCE [SOURCE ...] --out INDEX.arrow [--weights W ...] [--names N ...]
         [--probe] [--incremental] [--workers N]
  python tools/build_index.py --check INDEX.arrow [INDEX.arrow ...]

A SOURCE is an image folder (class subfolders -> labels, or flat), a folder or glob of .tar shards
(webdataset layout), or .parquet files (image bytes or paths). Several SOURCEs are merged into
one index with a `source` column; --weights repeats a source per epoch (2 = twice, 0.5 = half).
Entries that cannot be read (dangling symlinks, symlink loops, FIFOs, empty or unreadable files,
truncated or corrupt tar members, unreadable shards) are left out; the build ends with a summary
of what was skipped and why (a count per reason and the first few paths).
"""

import argparse
import os
import sys
import time

from eva_train.data.build import build_index
from eva_train.data.errors import DataError
from eva_train.data.index import check_index
from eva_train.data.skips import SkipReport


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", help="image folders, shard folders/globs, parquet files")
    p.add_argument("--out", help="output index file (written atomically)")
    p.add_argument("--weights", type=float, nargs="+", help="one repeat weight per SOURCE (default 1)")
    p.add_argument("--names", nargs="+", help="one name per SOURCE (default: the SOURCE text)")
    p.add_argument("--probe", action="store_true", help="record image width/height (reads every header)")
    p.add_argument("--incremental", action="store_true", help="reuse rows of shards already in --out")
    p.add_argument("--workers", type=int, default=0, help="parallel processes (default: all cores)")
    p.add_argument("--check", nargs="+", metavar="INDEX", help="only check existing index files and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.check:
            reader = check_index(args.check)
            print(f"ok: {len(reader)} rows, {len(reader.sources)} sources, {len(reader.containers)} containers")
            return 0
        if not args.sources or not args.out:
            raise DataError("give at least one SOURCE and --out INDEX.arrow (or --check INDEX.arrow)")
        if os.path.isdir(args.out):
            raise DataError(
                f"--out {args.out} is a folder; pass a file path, e.g. {os.path.join(args.out, 'index.arrow')}"
            )
        start, skipped = time.time(), SkipReport()
        build_index(
            args.sources,
            args.out,
            weights=args.weights,
            names=args.names,
            probe=args.probe,
            incremental=args.incremental,
            num_workers=args.workers,
            progress=True,
            skips=skipped,
        )
        reader = check_index([args.out])
        print(
            f"wrote {args.out}: {len(reader)} rows from {len(reader.containers)} containers "
            f"in {time.time() - start:.1f} s; {skipped.summary()}"
        )
        return 0
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the sources' own problems are skipped above: this is the output side
        print(
            f"error: cannot write the index ({exc}); pass --out a file path in a writable folder with free space",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
