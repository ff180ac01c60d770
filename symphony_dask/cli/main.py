"""The ``symphony-dask`` entry point: logging, warnings, the scheduler, and exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from contextlib import ExitStack

from symphony_dask.cli.commands import UsageError
from symphony_dask.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``symphony-dask`` command; returns the exit status (0 done, 2 refused input, 1 failed run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _log_to_stderr(verbose=args.verbose, quiet=args.quiet)
    from symphony_dask._dask.chunked import WorkerFailure
    from symphony_dask.cli.spelling import command_line_spelling

    try:
        with ExitStack() as stack:
            stack.enter_context(command_line_spelling())
            stack.enter_context(warnings.catch_warnings())
            warnings.showwarning = _show_warning
            args.check(args)
            _run_with_scheduler(args, stack)
            return args.run(args)
    except (UsageError, ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError) as err:
        print(f"symphony-dask: error: {err}", file=sys.stderr)
        return 2
    except (WorkerFailure, OSError) as err:  # OSError: an output the file system refuses (full, read-only)
        print(f"symphony-dask: error: {err}", file=sys.stderr)
        return 1


class _StderrHandler(logging.StreamHandler):
    """Log lines as they are, to the ``sys.stderr`` of the moment (notebooks and tests replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr(*, verbose: bool, quiet: bool) -> None:
    """symphony_dask's lines (one per finished stage or Harmony iteration) unless ``quiet``.

    With ``verbose``, every logger's (dask's messages about workers joining, ...).
    """
    package, root = logging.getLogger("symphony_dask"), logging.getLogger()
    for logger in (package, root):
        for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(handler)
    (root if verbose else package).addHandler(_StderrHandler())
    package.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if verbose:
        root.setLevel(logging.DEBUG)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"symphony-dask: warning: {message}", file=sys.stderr)


def _run_with_scheduler(args: argparse.Namespace, stack: ExitStack) -> None:
    """Connect to the cluster asked for, or draw progress bars on the threaded scheduler.

    A cluster started here is closed at the end.
    """
    from symphony_dask._dask.cluster import connect, wait_for_workers
    from symphony_dask._dask.dashboard import served_dashboard_link

    client = connect(cluster_file=args.cluster, scheduler=args.scheduler)
    if client is not None:
        if args.cluster is not None:  # started here: its workers (SLURM jobs, pods) end with the command
            stack.callback(client.cluster.close)
        stack.enter_context(client)
        link = served_dashboard_link(client)
        if link is not None:
            print(f"Dask dashboard: {link}", flush=True)
        wait_for_workers(client)
    elif not args.quiet:
        from symphony_dask._dask.progress import PassProgress

        stack.enter_context(PassProgress(minimum=1.0))
