"""The reference UMAP and the placement of cells into it (R Symphony's ``do_umap``).

The reference layout is fitted on the corrected embedding with R Symphony's uwot settings (30
neighbors, cosine metric, min_dist 0.1, seeded) by our UMAP (:mod:`symphony_dask._embedding.umap_kernels`:
umap-learn's algorithm and defaults, kernels compiled once and cached on disk, serial and
deterministic). Above :data:`MAX_FIT_CELLS` cells it is fitted on a seeded subsample and the other
reference cells are placed like query cells.

Placing a cell (umap-learn's ``transform``, with the layout held fixed): its ``n_neighbors`` nearest
fitted cells in the corrected embedding (cosine), fuzzy membership weights ``exp(-(d - rho) /
sigma)`` (``smooth_knn_dist``, local connectivity 0 as in ``transform``), a start at the weighted
mean of the neighbors' coordinates, then epochs of attraction to those neighbors and repulsion
from random fitted cells (as umap-learn's ``transform``: 100 epochs when at most 10,000 cells are
placed together, else 30, :func:`place_epochs`). Unlike umap-learn's ``transform``, which draws
its random samples from one stream over all query cells and scales the weights by the query's
largest, each cell here has its own random stream (seeded by the seed and the cell's row in the
query) and weights are taken against their largest possible value, 1: a cell lands at the same
coordinates whatever chunk, shard or worker it is placed in.

Only arrays are kept (coordinates, fitted rows, parameters): a loaded reference rebuilds what
placement needs from them and its embedding, and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass

import numpy as np

from symphony_dask._embedding.neighbors import hnsw_graph, hnsw_search
from symphony_dask._embedding.umap_kernels import find_ab_params, fit_layout, optimize_placement, smooth_knn_dist

#: Most reference cells the layout is fitted on; the others are placed into it.
MAX_FIT_CELLS = 20_000
#: Fitted cells up to which a placed cell's neighbors are found exactly (else by HNSW).
EXACT_SEARCH_MAX = 5_000
#: HNSW query breadth for placement, wide enough that placement finds nearly the exact neighbors at k = 30
#: (its measured recall is in benchmarks/README.md).
HNSW_EF = 100
_KEEP_INDEXES = 4
_indexes: dict[bytes, object] = {}
_index_lock = threading.Lock()
#: Cells per task when reference cells are placed into the fitted layout.
PLACE_CHUNK = 10_000


@dataclass(frozen=True)
class UmapParams:
    """The settings of a reference UMAP and the curve parameters ``a``, ``b`` of its layout."""

    n_neighbors: int
    min_dist: float
    a: float
    b: float
    seed: int
    metric: str = "cosine"
    negative_sample_rate: int = 5
    learning_rate: float = 1.0

    def to_dict(self) -> dict:
        """The settings and curve parameters as a dict of plain values (for a store's attributes)."""
        return asdict(self)


@dataclass
class UmapModel:
    """A reference UMAP: the coordinates of every reference cell, the rows it was fitted on, and its parameters.

    ``coords`` is cells x 2; ``fitted`` holds the reference rows the layout was fitted on (the others were
    placed into it).
    """

    coords: np.ndarray
    fitted: np.ndarray
    params: UmapParams

    def placement(self, embedding: np.ndarray, n_cells: int) -> Placement:
        """What placing ``n_cells`` cells needs, from the reference's corrected ``embedding``."""
        return Placement(
            np.asarray(embedding[self.fitted], dtype=np.float64),
            self.coords[self.fitted],
            self.params,
            place_epochs(n_cells),
        )


def place_epochs(n_cells: int) -> int:
    """Optimization epochs when ``n_cells`` cells are placed together (umap-learn's ``transform``)."""
    return 100 if n_cells <= 10_000 else 30


@dataclass
class Placement:
    """What placing cells needs: the fitted cells' embedding (cells x d) and coordinates (cells x 2).

    Call it on cells of the corrected embedding and their rows (see :func:`place_cells`).
    """

    embedding: np.ndarray
    coords: np.ndarray
    params: UmapParams
    epochs: int

    def __call__(self, cells: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return place_cells(cells, self.embedding, self.coords, self.params, rows=rows, epochs=self.epochs)


def fit_umap(
    embedding: np.ndarray,
    *,
    n_neighbors: int = 30,
    min_dist: float = 0.1,
    seed: int = 111,
    max_fit_cells: int = MAX_FIT_CELLS,
    chunk_size: int = PLACE_CHUNK,
) -> UmapModel:
    """Fit the reference UMAP on the corrected embedding (cells x d), on at most ``max_fit_cells`` cells.

    Above that, the layout is fitted on a seeded subsample and the other cells are placed in chunks of
    ``chunk_size`` cells with the active dask scheduler (on the workers of a cluster).
    """
    from symphony_dask._dask.chunked import compute, map_rows

    embedding = np.asarray(embedding, dtype=np.float64)
    n = embedding.shape[0]
    if n <= n_neighbors:
        raise ValueError(f"a UMAP needs more than n_neighbors={n_neighbors} reference cells, got {n}")
    rng = np.random.default_rng(seed)
    fitted = np.sort(rng.choice(n, max_fit_cells, replace=False)) if n > max_fit_cells else np.arange(n)
    # the fitted cells' own neighbors (each cell first), by the search that placement uses
    neighbors, distances = _cosine_neighbors(embedding[fitted], embedding[fitted], n_neighbors, seed)
    a, b = find_ab_params(1.0, min_dist)
    params = UmapParams(n_neighbors=n_neighbors, min_dist=min_dist, a=a, b=b, seed=seed)
    fitted_coords = fit_layout(
        neighbors,
        distances,
        _unit_rows(embedding[fitted]),
        a=a,
        b=b,
        seed=seed,
        negative_sample_rate=params.negative_sample_rate,
        learning_rate=params.learning_rate,
    )
    coords = np.empty((n, 2))
    coords[fitted] = fitted_coords
    model = UmapModel(coords, fitted, params)
    others = np.setdiff1d(np.arange(n), fitted)
    if len(others):
        import dask.array as da

        cells = da.from_array(embedding[others], chunks=(chunk_size, -1))
        rows = da.from_array(others, chunks=(chunk_size,))
        placed = map_rows(model.placement(embedding, len(others)), cells, rows, n_out=2)
        coords[others] = compute(placed)[0]
    return model


def place_cells(
    cells: np.ndarray,
    fitted_embedding: np.ndarray,
    fitted_coords: np.ndarray,
    params: UmapParams,
    *,
    rows: np.ndarray,
    epochs: int = 100,
) -> np.ndarray:
    """Kernel: UMAP coordinates (cells x 2) of ``cells`` (cells x d, corrected embedding) in a fitted layout.

    The layout is ``fitted_coords`` of ``fitted_embedding``. ``rows`` (one per cell, e.g. its row in the
    query) seeds each cell's random stream, so the result does not depend on how cells are chunked.
    """
    cells = np.asarray(cells, dtype=np.float64)
    if len(cells) == 0:
        return np.empty((0, 2))
    neighbors, distances = _cosine_neighbors(cells, fitted_embedding, params.n_neighbors, params.seed)
    weights = _membership(distances, params.n_neighbors)
    start = np.einsum("ck,ckj->cj", weights / weights.sum(axis=1, keepdims=True), fitted_coords[neighbors])
    return optimize_placement(
        start.astype(np.float32),
        fitted_coords.astype(np.float32),
        neighbors.astype(np.int64),
        weights.astype(np.float32),
        np.asarray(rows, dtype=np.uint64),
        np.uint64(params.seed),
        params.a,
        params.b,
        params.learning_rate / 4.0,
        params.negative_sample_rate,
        epochs,
    ).astype(np.float64)


def _cosine_neighbors(cells: np.ndarray, fitted: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest fitted cells of each cell by cosine distance, nearest first.

    The search is exact (a KD-tree over unit vectors, whose Euclidean distance ``c`` gives the cosine
    distance ``c^2 / 2``) up to :data:`EXACT_SEARCH_MAX` fitted cells, else through a seeded HNSW graph
    over them (inner product of unit vectors). Either way a cell's neighbors do not depend on the other
    cells searched with it.
    """
    unit, queries = _unit_rows(fitted), _unit_rows(cells)
    if len(fitted) <= EXACT_SEARCH_MAX:
        from scipy.spatial import cKDTree

        chord, neighbors = cKDTree(unit).query(queries, k=k)
        return (
            np.asarray(neighbors, dtype=np.int64).reshape(len(cells), k),
            np.asarray(chord).reshape(len(cells), k) ** 2 / 2,
        )
    neighbors, products = hnsw_search(_hnsw_index(unit, seed), queries, k, HNSW_EF)
    return neighbors, np.maximum(1.0 - products.astype(np.float64), 0.0)


def _hnsw_index(unit: np.ndarray, seed: int):
    """The HNSW graph over the fitted cells (inner product of unit vectors), built once per process.

    It is built single-threaded and seeded, so every process builds the same graph, and kept for the
    next chunks.
    """
    digest = hashlib.blake2b(unit.tobytes(), digest_size=16)
    digest.update(str(seed).encode())
    key = digest.digest()
    with _index_lock:
        index = _indexes.get(key)
        if index is None:
            index = hnsw_graph(unit, seed=seed, inner_product=True)
            while len(_indexes) >= _KEEP_INDEXES:
                _indexes.pop(next(iter(_indexes)))
            _indexes[key] = index
    return index


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """The rows of ``x`` scaled to unit length (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)


def _membership(distances: np.ndarray, k: int) -> np.ndarray:
    """umap-learn's fuzzy membership of each cell to its neighbors, as its ``transform`` computes it."""
    d32 = distances.astype(np.float32)
    sigmas, rhos = smooth_knn_dist(d32, float(k), local_connectivity=0.0)
    weights = np.exp(-np.maximum(d32 - rhos[:, None], 0.0) / sigmas[:, None])
    weights[d32 - rhos[:, None] <= 0] = 1.0
    return weights.astype(np.float64)
