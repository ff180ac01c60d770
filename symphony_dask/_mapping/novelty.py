"""Novelty of mapped query cells, and the threshold above which a cell is called 'Unknown'.

The novelty of a query cell is the mean Euclidean distance to its :data:`NOVELTY_K` nearest reference
cells in the corrected embedding: small inside the states the reference holds, large for a cell type
the reference lacks. On real data with one cell type left out of the reference (``tests/
test_uncertainty.py``) it separates the left-out cells better than the vote's confidence and better
than the per-cell mapping metric; it is a function of the cell and the reference alone, so the same in
every chunking, shard, thread and worker.

The threshold of ``unknown='auto'`` is calibrated on the reference alone (:func:`calibrate`): each
reference cell is taken out and looked up among the other reference cells as if it were a query cell,
and the threshold is a high quantile of those novelties. A reference cell is not quite a query cell,
though: its principal components were fitted to it, and in the components that are mostly noise its
coordinates spread much further than a projected query cell's do (two to three times on the test
data, where most genes are noise and there are fewer cells than genes). Looked up as they are, the
reference's own cells would look more novel than the query's, and the threshold would let every novel
type through. Each component of the held-out cell is therefore shrunk to the spread that a projected
cell is expected to have, predicted from the reference's own spectrum by the spiked covariance model
(Baik, Ben Arous and Peche 2005; Paul 2007; as for PC scores of new samples, Lee, Zou and Wright
2010): with ``g`` genes scaled to unit variance, ``n`` cells, ``gamma = g / n``, a noise variance
``s2`` and a sample eigenvalue ``l`` of a component, the population eigenvalue is
``s2 t`` with ``l / s2 = t + gamma t / (t - 1)`` when ``l`` is above the noise edge
``s2 (1 + sqrt(gamma))^2``, and a new cell's variance along the component is
``s2 (t c2 + 1 - c2)`` with ``c2 = (1 - gamma / (t - 1)^2) / (1 + gamma / (t - 1))``; below the edge
it is ``s2``. ``s2`` is set so that the spikes and the noise add up to the ``g`` units of variance of the
scaled genes.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from symphony_dask._reference.model import Reference

#: Reference neighbors whose mean distance is a query cell's novelty.
NOVELTY_K = 20
#: Quantile of the reference's own novelties (as held-out cells) that ``unknown='auto'`` takes as threshold.
UNKNOWN_QUANTILE = 0.95
#: Most reference cells held out to calibrate the threshold (evenly spaced rows above it).
MAX_CALIBRATION_CELLS = 20_000

_cache_lock = threading.Lock()
_cache: dict[tuple[int, int], tuple[object, np.ndarray]] = {}


def neighbor_distances(embedding, points: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    """Euclidean distance of each row of ``points`` to the ``embedding`` rows its row of ``neighbors`` names.

    Computed in float64 from the coordinates (not taken from the index), so that a cell's distances
    do not depend on the index's arithmetic or on which other cells are looked up with it.
    """
    diff = embedding_rows(embedding, neighbors) - np.asarray(points, dtype=np.float64)[:, None, :]
    return np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))


def embedding_rows(embedding, rows: np.ndarray) -> np.ndarray:
    """``embedding[rows]`` in float64 (any shape of ``rows``); of a lazy (dask) embedding only those rows are read."""
    if isinstance(embedding, np.ndarray):
        return np.asarray(embedding[rows], dtype=np.float64)
    wanted, where = np.unique(rows, return_inverse=True)
    values = np.asarray(embedding[wanted].compute() if hasattr(embedding, "compute") else embedding[wanted])
    return values.astype(np.float64)[where.reshape(rows.shape)]


def novelty(distances: np.ndarray, k: int = NOVELTY_K) -> np.ndarray:
    """Mean distance to the ``k`` nearest reference cells (columns of ``distances``, nearest first)."""
    return distances[:, :k].mean(axis=1)


@dataclass(frozen=True)
class Calibration:
    """The novelty threshold of ``unknown='auto'`` and how it was found (recorded in the query's ``uns``)."""

    threshold: float
    quantile: float
    k: int
    n_cells: int
    noise_variance: float
    n_signal_components: int

    def record(self) -> dict:
        """What ``query.uns['symphony'][f'{key}_unknown']`` records (JSON- and h5ad-writable)."""
        return {
            "threshold": self.threshold,
            "method": "auto",
            "quantile": self.quantile,
            "novelty_k": self.k,
            "calibration": "reference cells held out one at a time, each looked up among the others as a "
            "query cell, its components shrunk to a projected cell's spread (spiked covariance model)",
            "n_calibration_cells": self.n_cells,
            "noise_variance": self.noise_variance,
            "n_signal_components": self.n_signal_components,
        }


def calibrate(reference: Reference, *, k: int = NOVELTY_K, quantile: float = UNKNOWN_QUANTILE) -> Calibration:
    """The novelty above which a cell is 'Unknown': a quantile of the reference's own cells' novelty.

    Each reference cell (at most :data:`MAX_CALIBRATION_CELLS`, evenly spaced) is looked up among
    the other reference cells as a query cell would be, its coordinates shrunk per component to a
    projected cell's spread (:func:`out_of_sample_scale`); see the module docstring. The novelties
    are computed once per reference and ``k`` and kept while the reference lives.
    """
    if not 0 < quantile < 1:
        raise ValueError(f"the quantile of the unknown threshold must be between 0 and 1, got {quantile}")
    scores = _reference_novelty(reference, k)
    _, noise, n_signal = out_of_sample_scale(reference)
    return Calibration(
        threshold=float(np.quantile(scores, quantile)),
        quantile=float(quantile),
        k=int(k),
        n_cells=len(scores),
        noise_variance=noise,
        n_signal_components=n_signal,
    )


def out_of_sample_scale(reference: Reference) -> tuple[np.ndarray, float, int]:
    """Per component, a projected cell's expected spread over a reference cell's; the noise variance; the spikes.

    From the reference's singular values (its PCA's, recorded at build) or, for references without
    them, the variance of each embedding component; see the module docstring for the model. Components
    that hold more variance than the scaled genes have are not PCs of them: they are left as they are
    (factors 1, noise variance NaN).
    """
    n, g = reference.n_cells, reference.n_genes
    singular = np.asarray(reference.params.get("singular_values", ()), dtype=np.float64).ravel()
    n_fit = int(reference.params.get("n_cells", n))
    if singular.shape == (reference.n_pcs,) and n_fit > 1:
        eig = singular**2 / (n_fit - 1)
    else:  # e.g. a reference made from_arrays: its embedding's spread
        eig, n_fit = np.asarray(reference.embedding.var(axis=0, ddof=1), dtype=np.float64), n
    eig = np.maximum(eig, np.finfo(float).tiny)
    if eig.sum() >= g:  # more than the scaled genes' variance: not PCs of them; as they are
        return np.ones(len(eig)), float("nan"), len(eig)
    gamma = g / n_fit
    edge = (1.0 + np.sqrt(gamma)) ** 2
    noise = min(float(eig.min()) / edge, 1.0)
    for _ in range(200):
        t, spike = _population(eig / noise, gamma, edge)
        updated = g / (t[spike].sum() + g - spike.sum())
        if abs(updated - noise) <= 1e-12 * noise:
            break
        noise = updated
    t, spike = _population(eig / noise, gamma, edge)
    excess = np.where(spike, t - 1.0, 1.0)
    c2 = np.where(spike, np.clip((1.0 - gamma / excess**2) / (1.0 + gamma / excess), 0.0, 1.0), 0.0)
    expected = noise * (t * c2 + 1.0 - c2)
    return np.sqrt(np.minimum(expected / eig, 1.0)), float(noise), int(spike.sum())


def _population(s: np.ndarray, gamma: float, edge: float) -> tuple[np.ndarray, np.ndarray]:
    """Population eigenvalues (over the noise variance) of sample eigenvalues ``s`` above the edge; 1 below."""
    spike = s > edge
    b = s + 1.0 - gamma
    root = np.sqrt(np.maximum(b * b - 4.0 * s, 0.0))
    return np.where(spike, (b + root) / 2.0, 1.0), spike


def _reference_novelty(reference: Reference, k: int) -> np.ndarray:
    """Novelty of the calibration cells of ``reference`` as held-out cells (cached per reference and k)."""
    key = (id(reference), k)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None and cached[0] is reference.embedding:
        return cached[1]
    n = reference.n_cells
    if not 1 <= k < n:
        raise ValueError(f"the novelty's {k} neighbors must be fewer than the reference's {n} cells")
    rows = np.arange(n) if n <= MAX_CALIBRATION_CELLS else np.linspace(0, n - 1, MAX_CALIBRATION_CELLS).astype(int)
    points = embedding_rows(reference.embedding, rows) * out_of_sample_scale(reference)[0]
    found = reference.neighbor_index().query(points, k + 1)
    neighbors = _shift_out(found, found != rows[:, None])[:, :k]  # each cell's own row is not its neighbor
    scores = novelty(neighbor_distances(reference.embedding, points, neighbors), k)
    with _cache_lock:
        if key not in _cache:
            weakref.finalize(reference, _cache.pop, key, None)
        _cache[key] = (reference.embedding, scores)
    return scores


def _shift_out(found: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each row of ``found`` without its entries where ``keep`` is False, order kept (padded at the end)."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(found, order, axis=1)
