"""Input validation at the boundary of the public functions.

Each check raises (or warns) once, with a message that names what is wrong and how to fix it.
The value checks (NaN, inf, negative, integer-valued) are tree-reducible counts computed in the
same pass over the matrix as the first statistics, so validation adds no pass of its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .csr_kernels import as_csr, value_counts


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
        return ValueCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))


def count_bad_values(block: np.ndarray | sp.spmatrix) -> ValueCounts:
    """Kernel: counts of NaN, infinite, negative and non-integer stored values of one block, and of
    its cells whose values sum to zero."""
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


def raise_on_bad_values(counts: ValueCounts, *, where: str, normalize: bool, warn_empty: bool = True) -> None:
    """Error for NaN, inf or negative values; warn when the values do not look like the chosen input."""
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
            "expression must be finite and non-negative (raw counts with normalize=True, or "
            "log(CP10K+1) values with normalize=False)"
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
            f"{where} holds only integer values, which look like raw counts, but normalize=False; "
            "pass normalize=True to log(CP10K+1)-normalize them",
            UserWarning,
            stacklevel=3,
        )
    if normalize and counts.n_non_integer:
        warnings.warn(
            f"{where} holds {counts.n_non_integer} non-integer value(s) but normalize=True expects raw counts; "
            "if the data are already log-normalized pass normalize=False",
            UserWarning,
            stacklevel=3,
        )
