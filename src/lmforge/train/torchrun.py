"""`python -m lmforge.train.torchrun ARGS`: torchrun ARGS, without its own report of a failure.

A rank of an lmforge command that fails says why itself, in one line. torchrun adds a traceback
of its own, a table of the failure and warnings as it stops the other ranks, which bury that
line; here they are left out. A rank killed by a signal said nothing: that gets one line."""

from __future__ import annotations

import logging
import sys

from torch.distributed import run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


def main(argv: list[str]) -> int:
    """Run torchrun with `argv`; the exit status of its first failed rank (0 if none failed)."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run.main(argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
            return 1
        return failure.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
