"""Input validation at the boundary of the public functions.

Each check raises (or warns) once, with a message that names what is wrong and how to fix it.
The value checks (NaN, inf, negative, integer-valued) are tree-reducible counts computed in the
same pass over the matrix as the first statistics, so validation adds no pass of its own.
"""

from __future__ import annotations

import contextvars
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import astuple, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from symphony_dask._preprocessing.csr_kernels import as_csr, value_counts

#: How messages spell a keyword argument, ``spell(name, value)`` with ``value`` ``...`` when only the name is
#: said; ``None``: as Python takes it. The command line installs its flags (``symphony_dask.cli.spelling``).
_spelling: contextvars.ContextVar[Callable[[str, object], str] | None] = contextvars.ContextVar(
    "symphony_dask_spelling", default=None
)


@contextmanager
def spelled_by(spell: Callable[[str, object], str]) -> Iterator[None]:
    """Inside this block, messages spell keyword arguments with ``spell`` (e.g. as command-line flags)."""
    token = _spelling.set(spell)
    try:
        yield
    finally:
        _spelling.reset(token)


def option(name: str, value: object = ...) -> str:
    """The keyword argument ``name`` (set to ``value``, if given) as the user passes it.

    ``name=value`` in Python; whatever spelling :func:`spelled_by` installed (``--name value`` on the
    command line).
    """
    spell = _spelling.get()
    if spell is None:
        return name if value is ... else f"{name}={value!r}"
    return spell(name, value)


def pass_option(name: str, value: object) -> str:
    """How to ask for ``name=value``: "pass name=value" in Python, or as the command line spells it.

    On the command line: "pass --flag", "leave out --flag" or "pass --name value".
    """
    spelled = option(name, value)
    return f"leave out {spelled[3:]}" if spelled.startswith("no --") else f"pass {spelled}"


def as_key_list(keys: str | Sequence[str] | None) -> list[str]:
    """Normalize ``None``, one key or several keys to a list of keys."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    keys = list(keys)
    if not all(isinstance(k, str) for k in keys):
        raise TypeError(f"keys must be strings, got {keys!r}")
    return keys


def check_obs_keys(obs: pd.DataFrame, keys: Sequence[str], *, what: str = "batch key", where: str = "obs") -> None:
    """Every key must be a column of ``obs`` without missing values."""
    for key in keys:
        if key not in obs.columns:
            cols = ", ".join(map(repr, obs.columns)) or "(none)"
            raise ValueError(f"{what} {key!r} is not a column of {where}; the columns are: {cols}")
        n_missing = int(obs[key].isna().sum())
        if n_missing:
            raise ValueError(
                f"{what} {key!r} has {n_missing} missing value(s) in {where}; "
                "fill them (e.g. with 'unknown') or drop those cells"
            )


#: A batch column with more distinct values than this, and more than half as many as cells (fewer than
#: two cells per value on average), holds a per-cell measurement rather than groups of cells.
MANY_BATCH_VALUES = 100


def check_batch_values(obs: pd.DataFrame, keys: Sequence[str], *, what: str = "batch key", where: str = "obs") -> None:
    """Every key must name groups of cells, and its values must stay distinct when read as text.

    A column with more than :data:`MANY_BATCH_VALUES` distinct values and more than half
    as many as cells is refused (a per-cell value such as a count or a score is no batch; Harmony
    would try to correct each value as a batch of one or two cells). Batches are told apart by
    their text (:func:`~symphony_dask._harmony.mixture.make_design`), so values of different types that
    read the same (``1`` and ``'1'`` in an object column) are refused rather than merged.
    """
    n_cells = len(obs)
    for key in keys:
        column = obs[key]
        n_values = int(column.nunique())
        if n_values > MANY_BATCH_VALUES and 2 * n_values > n_cells:
            raise ValueError(
                f"{what} {key!r} has {n_values:,} distinct values over {n_cells:,} cells in {where} "
                f"({column.dtype} values, fewer than two cells each on average): a batch key must name groups of "
                "cells (donors, samples, technologies), not a per-cell measurement; choose a column of groups, "
                "or if these values are meant as batches, group them into a new obs column first (e.g. with "
                "pandas.cut)"
            )
        _check_values_read_apart(column, what=f"{what} {key!r}", where=where)


def _check_values_read_apart(column: pd.Series, *, what: str, where: str) -> None:
    """Raise when values of different kinds (text, number, boolean, ...) read the same as text."""
    values = column.cat.remove_unused_categories().cat.categories if column.dtype == "category" else column
    if values.dtype != object or not pd.api.types.infer_dtype(values).startswith("mixed"):  # one kind throughout
        return
    distinct = pd.DataFrame(
        {
            "value": values.to_numpy(),
            "text": values.astype(str).to_numpy(),
            "kind": [_kind(v) for v in values.to_numpy()],
        }
    ).drop_duplicates(["text", "kind"])
    clashing = distinct[distinct["text"].duplicated(keep=False)]
    if len(clashing):
        first = clashing[clashing["text"] == clashing["text"].iloc[0]]
        shown = " and ".join(f"{value!r} ({kind})" for value, kind in zip(first["value"], first["kind"], strict=True))
        raise ValueError(
            f"{what} in {where} holds values of different types that read the same as text, {shown}, which would "
            "be merged into one batch; make the column one type: convert it with .astype(str) to merge them on "
            "purpose, or relabel the values that are different batches"
        )


def _kind(value: object) -> str:
    """The kind of a value, as far as batches go: numbers of any type compare as numbers."""
    if isinstance(value, (bool, np.bool_)):
        return "boolean"
    if isinstance(value, numbers.Number):
        return "number"
    return "text" if isinstance(value, str) else type(value).__name__


def check_unique_genes(genes: pd.Index, *, where: str) -> None:
    """Gene names must be unique, or matching genes between datasets is ambiguous."""
    if not genes.is_unique:
        dup = genes[genes.duplicated()].unique()
        shown = ", ".join(map(str, dup[:10])) + (" ..." if len(dup) > 10 else "")
        raise ValueError(
            f"{where} has {len(dup)} duplicated gene name(s): {shown}; "
            "make them unique (e.g. AnnData.var_names_make_unique()) or use another gene key"
        )


@dataclass(frozen=True)
class ValueCounts:
    """Counts of problematic stored values and of cells without counts (a tree-reducible statistic)."""

    n_nan: int = 0
    n_inf: int = 0
    n_negative: int = 0
    n_non_integer: int = 0
    n_values: int = 0
    n_empty_cells: int = 0

    def __add__(self, other: ValueCounts) -> ValueCounts:
        return ValueCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


def count_bad_values(block: np.ndarray | sp.spmatrix) -> ValueCounts:
    """Kernel.

    Counts of NaN, infinite, negative and non-integer stored values of one block, and of its cells whose
    values sum to zero.
    """
    if sp.issparse(block):
        block = as_csr(block)
        indptr, values = block.indptr, block.data
    else:
        values = np.ascontiguousarray(block).ravel()
        indptr = np.arange(block.shape[0] + 1, dtype=np.int64) * block.shape[1]
    if values.dtype.kind == "b":
        values = values.view(np.uint8)
    n_nan, n_inf, n_negative, n_fraction, n_empty = map(int, value_counts(indptr, values))
    return ValueCounts(n_nan, n_inf, n_negative, n_fraction, int(values.size), n_empty)


def raise_on_bad_values(
    counts: ValueCounts, *, where: str, normalize: bool, warn_empty: bool = True, layers: Sequence[str] = ()
) -> None:
    """Error for NaN, inf or negative values; warn when the values do not look like the chosen input.

    ``layers`` are the other matrices of the AnnData read (``layers``), named in the warning when
    normalized values are read as raw counts (scanpy keeps log values in ``X``, counts in a layer).
    """
    problems = []
    if counts.n_nan:
        problems.append(f"{counts.n_nan} NaN")
    if counts.n_inf:
        problems.append(f"{counts.n_inf} infinite")
    if counts.n_negative:
        problems.append(f"{counts.n_negative} negative")
    if problems:
        raise ValueError(
            f"{where} holds {', '.join(problems)} value(s) out of {counts.n_values} stored values; "
            f"expression must be finite and non-negative (raw counts, or log(CP10K+1) values with "
            f"{option('normalize', False)})"
        )
    if counts.n_empty_cells and normalize and warn_empty:
        warnings.warn(
            f"{counts.n_empty_cells} cell(s) of {where} have zero total counts; they are mapped as cells "
            "expressing nothing (at the reference's scaled zero), so their results mean little",
            UserWarning,
            stacklevel=3,
        )
    if not normalize and counts.n_values and counts.n_non_integer == 0:
        warnings.warn(
            f"{where} holds only integer values, which look like raw counts, but {option('normalize', False)} "
            f"was given; {pass_option('normalize', True)} to log(CP10K+1)-normalize them",
            UserWarning,
            stacklevel=3,
        )
    if normalize and counts.n_non_integer:
        expects = "raw counts are expected (normalization is on)"
        hint = f"if they are log(CP10K+1) values, {pass_option('normalize', False)}"
        counts_layers = [name for name in layers if "count" in name.lower()] or list(layers)
        if counts_layers:
            shown = ", ".join(repr(name) for name in layers)
            hint = (
                f"if the raw counts are in a layer (this AnnData has layers {shown}), "
                f"{pass_option('layer', counts_layers[0])}; {hint}"
            )
        warnings.warn(
            f"{where} holds {counts.n_non_integer} non-integer value(s) but {expects}: they would be "
            f"normalized twice. {hint[0].upper()}{hint[1:]}",
            UserWarning,
            stacklevel=3,
        )
