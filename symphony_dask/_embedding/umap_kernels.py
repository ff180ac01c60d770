"""The UMAP algorithm (McInnes, Healy & Melville 2018) as compiled kernels, with umap-learn's defaults.

From the ``k`` nearest neighbors of each cell (itself first) to a 2-D layout:

1. :func:`smooth_knn_dist`: per cell, the distance ``rho`` to its nearest other neighbor and the
   scale ``sigma`` at which its neighbors' memberships ``exp(-(d - rho) / sigma)`` sum to
   ``log2(k)``;
2. :func:`fuzzy_graph`: those memberships, symmetrized by the fuzzy union ``P + P' - P o P'``, with
   the edges too weak to be sampled in ``n_epochs`` epochs dropped;
3. :func:`initial_layout`: the start, the eigenvectors of the graph's normalized Laplacian (each
   connected component's, around its place in a layout of the components);
4. :func:`optimize_layout`: epochs of stochastic gradient descent on the fuzzy cross-entropy, each
   edge sampled in proportion to its weight, with negative samples of random cells.

:func:`fit_layout` runs the four. The kernels are compiled once per signature and cached on disk
(numba ``cache=True``), so a process pays for compiling only on a fresh cache; the descent is serial
and draws from a seeded splitmix64 stream, so a layout is the same in any process. The placement of
cells into a fitted layout (:func:`optimize_placement`) shares the stream.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

#: Tolerance of the binary search for ``sigma`` (and below which a fractional connectivity is 0).
SMOOTH_K_TOLERANCE = 1e-5
#: ``sigma`` is at least this fraction of the mean distance to the neighbors.
MIN_K_DIST_SCALE = 1e-3


def find_ab_params(spread: float = 1.0, min_dist: float = 0.1) -> tuple[float, float]:
    """The curve ``1 / (1 + a x^(2b))`` of low-dimensional similarity that UMAP fits to its target curve.

    The fit is by least squares on ``[0, 3 spread]``, to 1 below ``min_dist`` and
    ``exp(-(x - min_dist) / spread)`` above it.

    Parameters
    ----------
    spread
        The scale of the embedded points.
    min_dist
        How close the embedded points may be.

    Returns
    -------
    tuple of float
        ``a`` and ``b``.
    """
    from scipy.optimize import curve_fit

    x = np.linspace(0.0, 3.0 * spread, 300)
    y = np.where(x < min_dist, 1.0, np.exp(-(x - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2.0 * b)), x, y)
    return float(a), float(b)


def smooth_knn_dist(
    distances: np.ndarray, k: float, n_iter: int = 64, local_connectivity: float = 1.0, bandwidth: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's distance ``rho`` to a near neighbor and the scale ``sigma`` of its fuzzy memberships.

    ``rho`` is the distance to the cell's ``local_connectivity``-th nearest neighbor at a nonzero distance.

    Parameters
    ----------
    distances
        Cells x k distances to each cell's neighbors, nearest first (the first, the cell itself
        when fitting, does not count toward the sum).
    k
        Neighbors per cell: ``sigma`` is found by a binary search so that the memberships
        ``exp(-max(d - rho, 0) / sigma)`` of all but the first neighbor sum to ``log2(k) * bandwidth``.
    n_iter
        Steps of the binary search.
    local_connectivity
        Which nonzero distance is ``rho`` (interpolated between two for a fractional value; 0:
        ``rho`` is 0).
    bandwidth
        Scales the target sum.

    Returns
    -------
    tuple of numpy.ndarray
        ``sigmas`` and ``rhos`` (float32, one per cell). ``sigma`` is at least 1e-3 times the
        cell's mean distance (the mean over all cells where ``rho`` is 0).
    """
    d = np.ascontiguousarray(distances, dtype=np.float32)
    return _smooth_knn_dist(d, float(np.log2(k) * bandwidth), int(n_iter), float(local_connectivity))


@numba.njit(cache=True)
def _smooth_knn_dist(
    distances: np.ndarray, target: float, n_iter: int, local_connectivity: float
) -> tuple[np.ndarray, np.ndarray]:
    n_cells, k = distances.shape
    sigmas = np.zeros(n_cells, dtype=np.float32)
    rhos = np.zeros(n_cells, dtype=np.float32)
    mean_all = distances.sum() / max(n_cells * k, 1)
    index = int(local_connectivity)
    fraction = local_connectivity - index
    for i in range(n_cells):
        row = distances[i]
        # the index-th and next nonzero distances (nearest first), the largest, and how many
        n_nonzero, total = 0, 0.0
        at = after = largest = np.float32(0.0)
        for j in range(k):
            total += row[j]
            if row[j] > 0.0:
                n_nonzero += 1
                largest = max(largest, row[j])
                if n_nonzero == max(index, 1):
                    at = row[j]
                elif n_nonzero == index + 1:
                    after = row[j]
        if local_connectivity > 0.0 and n_nonzero >= local_connectivity:
            if index == 0:
                rhos[i] = fraction * at
            else:
                rhos[i] = at
                if fraction > SMOOTH_K_TOLERANCE:
                    rhos[i] += fraction * (after - at)
        elif local_connectivity > 0.0 and n_nonzero > 0:
            rhos[i] = largest
        low, high, sigma = 0.0, np.inf, 1.0
        for _ in range(n_iter):
            psum = 0.0
            for j in range(1, k):
                excess = row[j] - rhos[i]  # float32, as the distances
                psum += np.exp(-(excess / sigma)) if excess > 0.0 else 1.0
            if abs(psum - target) < SMOOTH_K_TOLERANCE:
                break
            if psum > target:
                high = sigma
                sigma = (low + high) / 2.0
            else:
                low = sigma
                sigma = sigma * 2.0 if high == np.inf else (low + high) / 2.0
        sigmas[i] = sigma
        floor = MIN_K_DIST_SCALE * (total / k if rhos[i] > 0.0 else mean_all)
        sigmas[i] = max(sigmas[i], floor)
    return sigmas, rhos


def default_epochs(n_cells: int) -> int:
    """Optimization epochs of a layout of ``n_cells`` cells (umap-learn's default)."""
    return 500 if n_cells <= 10_000 else 200


def fuzzy_graph(neighbors: np.ndarray, distances: np.ndarray, n_epochs: int) -> sp.coo_matrix:
    """The fuzzy simplicial set of the cells' neighborhoods: the symmetric graph of membership strengths.

    Local connectivity is 1; the edges weaker than ``1 / n_epochs`` of the strongest are left out.

    Parameters
    ----------
    neighbors
        Cells x k neighbors (rows), each cell first.
    distances
        Their distances.
    n_epochs
        Optimization epochs: an edge sampled less than once in them is dropped.

    Returns
    -------
    scipy.sparse.coo_matrix
        Cells x cells, rows in order.
    """
    n_cells, k = neighbors.shape
    d = np.ascontiguousarray(distances, dtype=np.float32)
    sigmas, rhos = smooth_knn_dist(d, float(k))
    excess = d - rhos[:, None]
    strengths = np.exp(-np.maximum(excess, 0.0) / sigmas[:, None])
    strengths[excess <= 0.0] = 1.0
    rows = np.repeat(np.arange(n_cells), k)
    strengths[neighbors == np.arange(n_cells)[:, None]] = 0.0
    directed = sp.csr_matrix((strengths.ravel().astype(np.float64), (rows, neighbors.ravel())), shape=(n_cells,) * 2)
    directed.eliminate_zeros()
    transposed = directed.T.tocsr()
    graph = (directed + transposed - directed.multiply(transposed)).tocsr()
    graph.data[graph.data < graph.data.max() / n_epochs] = 0.0
    graph.eliminate_zeros()
    graph.sort_indices()
    return graph.tocoo()


def initial_layout(graph: sp.spmatrix, data: np.ndarray, seed: int) -> np.ndarray:
    """The start of the optimization (cells x 2, in [0, 10] on each axis).

    It is :func:`spectral_layout` scaled to a largest coordinate of 10 with noise of 1e-4, both seeded.
    """
    start = spectral_layout(graph, data, seed)
    rng = np.random.default_rng(seed)
    start = start * (10.0 / np.abs(start).max()) + rng.normal(scale=1e-4, size=start.shape)
    low = start.min(axis=0)
    return 10.0 * (start - low) / (start.max(axis=0) - low)


def spectral_layout(graph: sp.spmatrix, data: np.ndarray, seed: int) -> np.ndarray:
    """The graph's spectral layout (cells x 2): the smallest non-trivial eigenvectors of its Laplacian.

    The layout is the two smallest non-trivial eigenvectors of the normalized Laplacian. A graph of
    several connected components has each laid out so, scaled to half the distance to the nearest
    other component, around its place in :func:`component_places`. Where the eigensolver fails, or for
    a component of fewer than 4 cells, the cells are spread at random (seeded) over the same range.
    """
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(seed)
    n_components, labels = connected_components(graph, directed=False)
    if n_components == 1:
        layout = _spectral(graph, seed)
        return rng.uniform(-10.0, 10.0, size=(graph.shape[0], 2)) if layout is None else layout
    places = component_places(data, labels, n_components)
    order = np.argsort(labels, kind="stable")  # each component a block on the diagonal
    blocks = graph.tocsr()[order][:, order]
    ends = np.cumsum(np.bincount(labels, minlength=n_components))
    result = np.empty((graph.shape[0], 2))
    for component, place in enumerate(places):
        start, end = ends[component - 1] if component else 0, ends[component]
        gaps = np.linalg.norm(places - place, axis=1)
        half = gaps[gaps > 0].min() / 2.0 if np.any(gaps > 0) else 1.0
        layout = _spectral(blocks[start:end, start:end], seed) if end - start >= 4 else None
        if layout is None:
            layout = rng.uniform(-1.0, 1.0, size=(end - start, 2))
        result[order[start:end]] = place + layout * (half / np.abs(layout).max())
    return result


def component_places(data: np.ndarray, labels: np.ndarray, n_components: int) -> np.ndarray:
    """Where the connected components of a graph go (components x 2, within [-1, 1]).

    Up to 4 go on the ends of the axes; more are placed by the spectral embedding of their centroids in
    ``data`` (cells x d, rows of unit length) with affinities ``exp(-d^2)`` of their cosine distances ``d``.
    """
    if n_components <= 4:
        return np.array(
            [[1.0, 0.0], [-1.0, 0.0]]
            if n_components == 2
            else [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]][:n_components]
        )
    centroids = np.zeros((n_components, data.shape[1]))
    np.add.at(centroids, labels, data)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-300)
    affinity = np.exp(-(np.maximum(1.0 - centroids @ centroids.T, 0.0) ** 2))
    scale = 1.0 / np.sqrt(affinity.sum(axis=1))
    values, vectors = np.linalg.eigh(np.identity(n_components) - scale[:, None] * affinity * scale[None, :])
    places = vectors[:, np.argsort(values)[1:3]] * scale[:, None]
    return places / np.abs(places).max()


def _spectral(graph: sp.spmatrix, seed: int) -> np.ndarray | None:
    """The two smallest non-trivial eigenvectors (cells x 2) of a connected graph's normalized Laplacian.

    The Laplacian is ``I - A``; its smallest eigenvectors are found as the largest of
    ``A = D^-1/2 W D^-1/2`` (ARPACK from a seeded start, to 1e-4: where eigenvalues are close, a mix of
    them, which serves as well as a start). None when the eigensolver fails.
    """
    from scipy.sparse.linalg import ArpackError, eigsh
    from threadpoolctl import threadpool_limits

    n_cells = graph.shape[0]
    scale = sp.diags(1.0 / np.sqrt(np.asarray(graph.sum(axis=0)).ravel()))
    v0 = np.random.default_rng(seed).normal(size=n_cells)
    ncv = min(n_cells, max(7, int(np.sqrt(n_cells))))
    try:
        with threadpool_limits(limits=1, user_api="blas"):  # the same round-off in any process
            values, vectors = eigsh(scale @ graph @ scale, 3, which="LA", ncv=ncv, tol=1e-4, v0=v0, maxiter=n_cells * 5)
    except ArpackError:
        return None
    return vectors[:, np.argsort(values)[1::-1]]


def fit_layout(
    neighbors: np.ndarray,
    distances: np.ndarray,
    data: np.ndarray,
    *,
    a: float,
    b: float,
    seed: int,
    negative_sample_rate: int = 5,
    learning_rate: float = 1.0,
) -> np.ndarray:
    """A UMAP layout (cells x 2) of cells from their neighbors (cells x k, each cell first) and distances.

    It runs :func:`fuzzy_graph`, :func:`initial_layout` and :func:`optimize_layout` with
    :func:`default_epochs`, seeded by ``seed``. ``data`` (cells x d, rows of unit length) places the
    graph's connected components (:func:`component_places`).
    """
    n_epochs = default_epochs(len(neighbors))
    graph = fuzzy_graph(neighbors, distances, n_epochs)
    layout = initial_layout(graph, data, seed)
    return optimize_layout(
        layout,
        graph,
        a=a,
        b=b,
        n_epochs=n_epochs,
        seed=seed,
        negative_sample_rate=negative_sample_rate,
        learning_rate=learning_rate,
    )


def optimize_layout(
    layout: np.ndarray,
    graph: sp.coo_matrix,
    *,
    a: float,
    b: float,
    n_epochs: int,
    seed: int,
    negative_sample_rate: int = 5,
    learning_rate: float = 1.0,
) -> np.ndarray:
    """``n_epochs`` epochs of UMAP's stochastic gradient descent from ``layout`` (cells x 2).

    Both ends of an edge are moved; an edge of weight ``w`` is sampled every ``max(w) / w`` epochs, each
    time with ``negative_sample_rate`` repulsions from random cells; the learning rate falls linearly
    to 0.

    Returns
    -------
    numpy.ndarray
        The layout (cells x 2, float64).
    """
    every = graph.data.max() / graph.data
    return _optimize_layout(
        np.array(layout, dtype=np.float64),
        graph.row.astype(np.int64),
        graph.col.astype(np.int64),
        every.astype(np.float64),
        float(a),
        float(b),
        int(n_epochs),
        int(negative_sample_rate),
        float(learning_rate),
        np.uint64(seed),
    )


@numba.njit(cache=True, inline="always")
def _next(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    """splitmix64: the next state and a random 64-bit value."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@numba.njit(cache=True, inline="always")
def _clip(value: float) -> float:
    return min(max(value, -4.0), 4.0)


@numba.njit(cache=True)
def _optimize_layout(
    y: np.ndarray,
    head: np.ndarray,
    tail: np.ndarray,
    every: np.ndarray,
    a: float,
    b: float,
    n_epochs: int,
    negative_rate: int,
    alpha0: float,
    seed: np.uint64,
) -> np.ndarray:
    n_cells = y.shape[0]
    every_negative = every / negative_rate
    next_sample = every.copy()
    next_negative = every_negative.copy()
    state = seed
    for epoch in range(n_epochs):
        alpha = alpha0 * (1.0 - epoch / n_epochs)
        for e in range(len(head)):
            if next_sample[e] > epoch:
                continue
            i, j = head[e], tail[e]
            dx, dy = y[i, 0] - y[j, 0], y[i, 1] - y[j, 1]
            d2 = dx * dx + dy * dy
            if d2 > 0.0:
                coeff = -2.0 * a * b * d2 ** (b - 1.0) / (a * d2**b + 1.0)
                gx, gy = _clip(coeff * dx) * alpha, _clip(coeff * dy) * alpha
                y[i, 0] += gx
                y[i, 1] += gy
                y[j, 0] -= gx
                y[j, 1] -= gy
            next_sample[e] += every[e]
            n_negative = int((epoch - next_negative[e]) / every_negative[e])
            for _ in range(n_negative):
                state, r = _next(state)
                other = r % np.uint64(n_cells)
                dx, dy = y[i, 0] - y[other, 0], y[i, 1] - y[other, 1]
                d2 = dx * dx + dy * dy
                if d2 > 0.0:
                    coeff = 2.0 * b / ((0.001 + d2) * (a * d2**b + 1.0))
                    y[i, 0] += _clip(coeff * dx) * alpha
                    y[i, 1] += _clip(coeff * dy) * alpha
            next_negative[e] += n_negative * every_negative[e]
    return y


@numba.njit(cache=True)
def optimize_placement(
    y: np.ndarray,
    fitted: np.ndarray,
    neighbors: np.ndarray,
    weights: np.ndarray,
    rows: np.ndarray,
    seed: np.uint64,
    a: float,
    b: float,
    alpha0: float,
    negative_rate: int,
    n_epochs: int,
) -> np.ndarray:
    """Move each cell (row of ``y``) toward its neighbors and away from random fitted cells.

    The fitted layout is held fixed (umap-learn's ``optimize_layout_euclidean`` with move_other=False,
    per-cell random streams, weights scaled by 1). Serial: dask runs chunks in parallel.
    """
    n_cells, k = neighbors.shape
    n_fitted = fitted.shape[0]
    out = y.copy()
    for c in range(n_cells):
        state = seed ^ (rows[c] * np.uint64(0xD1B54A32D192ED03))
        state, _ = _next(state)
        yc = out[c]
        # sample schedule (make_epochs_per_sample against the largest possible weight, 1)
        every = np.full(k, -1.0)
        for j in range(k):
            if weights[c, j] >= 1.0 / n_epochs:
                every[j] = 1.0 / weights[c, j]
        next_sample = every.copy()
        every_negative = every / negative_rate
        next_negative = every_negative.copy()
        for epoch in range(n_epochs):
            alpha = alpha0 * (1.0 - epoch / n_epochs)
            for j in range(k):
                if every[j] < 0 or next_sample[j] > epoch:
                    continue
                other = fitted[neighbors[c, j]]
                dx, dy = yc[0] - other[0], yc[1] - other[1]
                d2 = dx * dx + dy * dy
                if d2 > 0.0:
                    coeff = -2.0 * a * b * d2 ** (b - 1.0) / (a * d2**b + 1.0)
                    yc[0] += _clip(coeff * dx) * alpha
                    yc[1] += _clip(coeff * dy) * alpha
                next_sample[j] += every[j]
                n_negative = int((epoch - next_negative[j]) / every_negative[j])
                for _ in range(n_negative):
                    state, r = _next(state)
                    other = fitted[r % np.uint64(n_fitted)]
                    dx, dy = yc[0] - other[0], yc[1] - other[1]
                    d2 = dx * dx + dy * dy
                    if d2 > 0.0:
                        coeff = 2.0 * b / ((0.001 + d2) * (a * d2**b + 1.0))
                        yc[0] += _clip(coeff * dx) * alpha
                        yc[1] += _clip(coeff * dy) * alpha
                    else:
                        yc[0] += 4.0 * alpha
                        yc[1] += 4.0 * alpha
                next_negative[j] += n_negative * every_negative[j]
    return out
