"""The result of a Harmony run: the corrected embedding and soft clusters, kept where they were computed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.delayed import Delayed

from symphony_dask._dask.chunked import aligned_blocks
from symphony_dask._harmony.chunk import chunk_output


@dataclass(frozen=True)
class OutputCall:
    """One call of :func:`~symphony_dask._harmony.chunk.chunk_output`.

    Its positional arguments (some of them delayed), the piece it asks for (``None``: the whole
    chunk), the worker holding the chunk's group (``None``: this process) and the rows it gives.
    """

    args: tuple
    piece: int | None
    worker: str | None
    rows: int

    def placement(self) -> contextlib.AbstractContextManager:
        """Annotations that run the call beside its group, where the group lives on a worker."""
        if self.worker:
            return dask.annotate(workers=[self.worker], allow_other_workers=True)
        return contextlib.nullcontext()


def _with_assignments(kernel: Callable[..., Any], args: tuple, piece: int | None, *blocks: np.ndarray) -> Any:
    return kernel(*blocks, chunk_output(*args, piece=piece))


@dataclass(eq=False, repr=False)
class HarmonyResult:
    """Output of :func:`~symphony_dask.harmonize`.

    Attributes
    ----------
    Z_corr
        Corrected embedding (cells x d); a dask array with the row chunks of a dask input.
    R
        Soft cluster assignments (cells x k) after the last clustering iteration, rows sum to one;
        chunked like ``Z_corr``. Harmony never stores them for all cells: they are recomputed from
        the embedding, the centroids and the block penalties when first asked for.
    centroids
        Harmony's final L2-normalized centroids ``Y`` (d x k).
    n_iter
        Harmony iterations run.
    objective
        Objective after the initialization and after each iteration's clustering.
    converged
        Whether the Harmony objective met ``epsilon_harmony`` before ``max_iter_harmony``.
    cluster_iterations
        Clustering iterations run, over all Harmony iterations.
    timings_s
        Wall time of the k-means start, the clustering and the correction.
    """

    Z_corr: np.ndarray | da.Array
    centroids: np.ndarray
    n_iter: int
    objective: list[float]
    converged: bool
    timings_s: dict[str, float]
    cluster_iterations: int = 0
    #: ``R``, or until first asked for, the function that computes it
    _assignments: Any = field(default=None, repr=False)
    #: keeps the chunk groups (and so a cheap ``R``) alive with the result
    _groups: Any = field(default=None, repr=False)
    #: for a dask result, the calls that give ``R`` one Harmony piece at a time
    _assignment_pieces: list[OutputCall] | None = field(default=None, repr=False)

    @property
    def R(self) -> np.ndarray | da.Array:
        if callable(self._assignments):
            self._assignments = self._assignments()
        return self._assignments

    def map_assignment_pieces(self, kernel: Callable[..., Any], *aligned: da.Array) -> list[Delayed]:
        """``kernel(*aligned_rows, R_rows)`` over Harmony's pieces of at most 32,768 cells, delayed, in cell order.

        Each task computes its piece of ``R`` and hands it straight to ``kernel``, so a running task
        holds no more than a piece of ``R``. (``R`` itself is chunked by Harmony's chunks of up to
        250,000 cells, 200 MB at k = 100, and dask computes many of them before their consumers
        run.) Only for a result of dask input: a NumPy result has ``R`` in memory.

        Parameters
        ----------
        kernel
            Called with each piece's rows of ``aligned`` and its ``R``.
        *aligned
            Per-cell dask arrays, cut into the same pieces.
        """
        if self._assignment_pieces is None:
            raise ValueError("map_assignment_pieces needs a result of dask input; use R for a NumPy result")
        rows = tuple(call.rows for call in self._assignment_pieces)
        blocks = [aligned_blocks(a, rows) for a in aligned]
        out = []
        for i, call in enumerate(self._assignment_pieces):
            with call.placement():
                out.append(
                    dask.delayed(_with_assignments, pure=False)(kernel, call.args, call.piece, *(b[i] for b in blocks))
                )
        return out

    def __repr__(self) -> str:
        return (
            f"HarmonyResult({self.Z_corr.shape[0]} cells, k={self.centroids.shape[1]}, n_iter={self.n_iter}, "
            f"converged={self.converged})"
        )
