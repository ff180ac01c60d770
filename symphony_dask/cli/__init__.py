"""Command line: ``symphony-dask build``, ``symphony-dask map`` and ``symphony-dask demo``.

``main`` parses and runs a command (:mod:`~symphony_dask.cli.main`); the parser and its help live in
:mod:`~symphony_dask.cli.parser`, the commands in :mod:`~symphony_dask.cli.commands`, what they write
in :mod:`~symphony_dask.cli.outputs`, the flags' spelling in library messages in
:mod:`~symphony_dask.cli.spelling`. Heavy modules are imported when a command runs, so that
``--help`` answers at once.
"""

from symphony_dask.cli.main import main

__all__ = ["main"]
