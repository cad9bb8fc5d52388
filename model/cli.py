"""How every script under scripts/ ends: a user's mistake is one line and exit status 2, never a traceback.

    from model.cli import UsageError, run
    if __name__ == "__main__":
        run(main)            # main(argv) -> int | None

A script raises `UsageError` (or lets a `ValueError` / `FileNotFoundError` from a check escape) for
anything the user can fix: the message is printed as `error: <message>` on stderr and the process
exits 2, argparse's status for a bad command line, in every script alike. Ctrl-C is 130 and SIGTERM
143 (128 + the signal number, as a shell reports them) with one line, not a `KeyboardInterrupt`
traceback. Output piped into a reader that stops early (`generate.py ... | head`) ends the script
quietly with 141 (128 + SIGPIPE), as a Unix tool would. Anything else is a bug, and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys

USAGE_EXIT = 2  # argparse's own status for a bad command line


class UsageError(Exception):
    """Something the user can fix (a flag, a file, the machine): shown as one line, exit status 2."""


class Terminated(Exception):
    """SIGTERM, turned into an exception (by `terminate_as_exception`) so that `finally` blocks run."""


def terminate_as_exception() -> None:
    """From now on SIGTERM raises `Terminated` in the main thread, the way SIGINT raises KeyboardInterrupt."""

    def handler(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def run(main, argv: list[str] | None = None) -> None:
    """Call main(argv) and exit with its status, mapping the user's mistakes and signals to one line."""
    try:
        status = main(argv)
    except (UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
            UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:
        # The reader of stdout has gone. Point stdout at /dev/null so that the flush at exit cannot
        # raise again (Python's documented recipe), and end as a process killed by SIGPIPE reports.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + getattr(signal, "SIGPIPE", 13))
    sys.exit(status or 0)
