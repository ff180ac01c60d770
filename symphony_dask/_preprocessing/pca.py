"""PCA of the scaled reference without densifying it: a truncated SVD from passes over the gene cache.

Symphony takes the truncated SVD ``G_rs = U Sigma V^T`` of the scaled genes x cells matrix (no
re-centering after the clip) and keeps the loadings ``U`` (genes x d); the reference embedding is
``Z = U^T G_rs`` (here cells x d: ``Z = S U`` with ``S`` the scaled cells x genes matrix). Every pass
reads the gene cache (:mod:`~symphony_dask._preprocessing.gene_cache`: the chosen genes' stored values),
never the whole matrix; two solvers:

- ``'gram'`` (exact): one pass accumulates ``S^T S`` (genes x genes) from each chunk's scaled genes,
  densified; its top eigenvectors are ``U`` and the square roots of its eigenvalues the singular
  values. Cost per cell ~ g^2 (BLAS).
- ``'krylov'`` (randomized block Krylov, Halko et al. 2011; Musco and Musco 2015): from a seeded
  Gaussian block ``W_0`` (genes x l, ``l = d + 10``), each pass applies ``S^T S`` to the newest
  block (``S_c^T (S_c W)`` per chunk from its stored values alone,
  :func:`~symphony_dask._preprocessing.csr_kernels.cached_product`, reduced); the blocks,
  orthonormalized against each other, span a Krylov space ``V``, and Rayleigh-Ritz on it (from the
  same pass results) gives ``U`` and the singular values; passes stop when every top Ritz pair's
  residual norm is below :data:`KRYLOV_TOLERANCE` times the top Ritz value. Cost per cell ~ passes x
  stored values x l. Spectra of scRNA-seq data are flat around d = 20 (beyond the cell types, PCs
  sit in a noise bulk), where plain subspace iteration stalls and the Krylov space does not.

``'auto'`` picks the faster by the measured costs of their kernels. Sign convention: each component is
oriented so that its largest-magnitude loading is positive, so that a rebuilt reference is identical to
the first.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, Literal

import dask.array as da
import numpy as np
import scipy.linalg
import scipy.sparse as sp

from symphony_dask._dask.chunked import compute, map_reduce, one_blas_thread_per_task
from symphony_dask._preprocessing.csr_kernels import as_csr, cached_product, scaled_rows
from symphony_dask._preprocessing.gene_cache import GeneCache, chosen_genes, gene_cache
from symphony_dask._preprocessing.normalize import SCALE_CLIP, Block, scale

logger = logging.getLogger("symphony_dask")

PCASolver = Literal["auto", "gram", "krylov"]
#: Krylov block width beyond the number of components; iterations stop when every top Ritz pair's
#: residual norm ||M u - theta u|| is below KRYLOV_TOLERANCE times the top Ritz value (the error of
#: a loading vector is about its residual over the eigengap), or after KRYLOV_MAX_ITERATIONS passes.
KRYLOV_OVERSAMPLING = 10
KRYLOV_TOLERANCE = 1e-9
KRYLOV_MAX_ITERATIONS = 40
#: Passes the cost model assumes (typical to reach the tolerance on scRNA-seq data).
KRYLOV_TYPICAL_PASSES = 15
#: Nanoseconds per cell of the solvers' kernels, one thread (measured, benchmarks/README.md "PCA solvers"):
#: densifying one scaled gene; one entry of the Gram matrix (BLAS); normalizing and scaling one stored
#: value; one multiply-add of a stored value with a row of the Krylov block.
COST_NS = {"densify": 3.0, "gemm": 0.012, "value": 14.0, "multiply_add": 0.2}
#: Most genes of the Gram solver: its genes x genes partial sums (128 MB at 4,000 genes) meet in a tree
#: reduction, several at a time.
GRAM_MAX_GENES = 4_000


def project(
    block: Block,
    genes: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    loadings: np.ndarray,
    *,
    normalize: bool,
    idf: np.ndarray | None = None,
) -> np.ndarray:
    """Kernel: PC embedding ``scale(block) @ loadings`` of one chunk (cells x d).

    ``idf`` (one value per column of the block) makes the normalization TF-IDF. A sparse chunk is never
    densified: its chosen genes are taken as a gene cache chunk is, and projected as the reference's cells
    are (:func:`cached_project`: the scaled zeros plus, for each stored value, the difference it makes).
    Equal to the dense product up to round-off.
    """
    if not sp.issparse(block):
        return scale(block, genes, mean, std, normalize=normalize, idf=idf) @ loadings
    chosen, row_factors = chosen_genes(as_csr(block), genes, normalize, idf)
    gene_factors = np.ones(len(genes)) if idf is None else np.asarray(idf, dtype=np.float64)[genes]
    return cached_project(
        chosen, row_factors, loadings=loadings, mean=np.asarray(mean, dtype=np.float64),
        std=np.asarray(std, dtype=np.float64), gene_factors=gene_factors, transform=bool(normalize),
    )  # fmt: skip


def cached_gram(block: sp.csr_matrix, row_factors: np.ndarray, **args: Any) -> np.ndarray:
    """Kernel: ``S^T S`` (genes x genes) of a chunk of the gene cache, ``S`` its scaled genes densified."""
    s = _cached_scaled(block, row_factors, **args)
    return s.T @ s


def cached_apply_gram(block: sp.csr_matrix, row_factors: np.ndarray, *, w: np.ndarray, **args: Any) -> np.ndarray:
    """Kernel: ``S^T (S W)`` (genes x l) of a chunk of the gene cache, without forming ``S``."""
    return _cached_product(block, row_factors, w, gram=True, **args)


def cached_project(block: sp.csr_matrix, row_factors: np.ndarray, *, loadings: np.ndarray, **args: Any) -> np.ndarray:
    """Kernel: the PC embedding ``S U`` (cells x d) of a chunk of the gene cache, without forming ``S``."""
    return _cached_product(block, row_factors, loadings, gram=False, **args)


def _cached_product(block, row_factors, w, *, gram, mean, std, gene_factors, transform) -> np.ndarray:
    return cached_product(
        block.indptr, block.indices, block.data, row_factors, gene_factors, transform, mean, std,
        float(SCALE_CLIP), np.ascontiguousarray(w, dtype=np.float64), gram,
    )  # fmt: skip


def _cached_scaled(block, row_factors, *, mean, std, gene_factors, transform) -> np.ndarray:
    position = np.arange(block.shape[1], dtype=np.int64)
    return scaled_rows(
        block.indptr, block.indices, block.data, position, mean, std, float(SCALE_CLIP), row_factors,
        gene_factors, transform,
    )  # fmt: skip


def orient(loadings: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude is positive."""
    idx = np.argmax(np.abs(loadings), axis=0)
    signs = np.sign(loadings[idx, np.arange(loadings.shape[1])])
    signs[signs == 0] = 1.0
    return loadings * signs


def top_eigenpairs(matrix: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` largest eigenvalues (descending, clipped at 0) and eigenvectors of a symmetric matrix."""
    size = matrix.shape[0]
    evals, evecs = scipy.linalg.eigh(matrix, subset_by_index=(size - n, size - 1))
    order = np.argsort(evals)[::-1]
    return np.clip(evals[order], 0.0, None), evecs[:, order]


def svd_from_gram(gram_matrix: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n_components`` left singular vectors (oriented) and singular values from a Gram matrix."""
    g = gram_matrix.shape[0]
    if not 0 < n_components <= g:
        raise ValueError(f"cannot take {n_components} principal components of {g} genes")
    evals, evecs = top_eigenpairs(gram_matrix, n_components)
    return orient(evecs), np.sqrt(evals)


def choose_solver(n_genes: int, n_components: int, stored_per_cell: float | None = None) -> Literal["gram", "krylov"]:
    """The solver that takes less time per cell, by the costs of their kernels (:data:`COST_NS`).

    Above :data:`GRAM_MAX_GENES` genes, Krylov (the Gram matrices would not fit a task's memory).

    ``stored_per_cell`` is the gene cache's stored values per cell (default: every gene, dense data).
    The Gram solver densifies each chunk's scaled genes and multiplies them (BLAS) in one pass; the
    Krylov solver walks the stored values of the cache on every pass.
    """
    if n_genes > GRAM_MAX_GENES:
        return "krylov"
    stored = n_genes if stored_per_cell is None else stored_per_cell
    block = n_components + KRYLOV_OVERSAMPLING
    gram_ns = COST_NS["densify"] * n_genes + COST_NS["gemm"] * n_genes**2
    krylov_ns = KRYLOV_TYPICAL_PASSES * stored * (COST_NS["value"] + COST_NS["multiply_add"] * 2 * block)
    return "gram" if gram_ns <= krylov_ns else "krylov"


@dataclass(frozen=True)
class FittedPCA:
    """A PCA fitted by passes over the cells: its loadings, singular values, solver and number of passes.

    ``loadings`` are genes x d, each column oriented so that its largest entry is positive; the
    ``singular_values`` are those of the scaled matrix; ``solver`` is the one used and ``passes`` the
    number of passes over the data it took.
    """

    loadings: np.ndarray
    singular_values: np.ndarray
    solver: str
    passes: int


def fit_pca(x: da.Array, scaling: dict, n_components: int, *, solver: PCASolver = "auto", seed: int = 0) -> FittedPCA:
    """The top ``n_components`` principal axes of the scaled chosen genes of ``x``, from a gene cache in memory.

    ``scaling`` holds the :func:`~symphony_dask._preprocessing.normalize.scale` arguments (chosen genes,
    their means and SDs, whether to normalize, the IDF); see :func:`fit_cached_pca`.
    """
    genes, mean, std = scaling["genes"], scaling["mean"], scaling["std"]
    normalize, idf = scaling["normalize"], scaling.get("idf")
    with gene_cache(x, genes, mean, std, normalize=normalize, idf=idf, storage="memory") as cache:
        return fit_cached_pca(cache, n_components, solver=solver, seed=seed)


def fit_cached_pca(cache: GeneCache, n_components: int, *, solver: PCASolver = "auto", seed: int = 0) -> FittedPCA:
    """The top ``n_components`` principal axes of the scaled genes of a gene cache, from passes over it."""
    n_cells, n_genes = cache.x.shape
    if not 0 < n_components < min(n_genes, n_cells):
        raise ValueError(f"cannot take {n_components} principal components of {n_cells} cells x {n_genes} genes")
    if solver == "auto":
        solver = choose_solver(n_genes, n_components, cache.stored / max(n_cells, 1))
    if solver not in ("gram", "krylov"):
        raise ValueError(f"pca_solver must be 'auto', 'gram' or 'krylov', got {solver!r}")
    logger.info("PCA of %d genes by the %s solver", n_genes, solver)
    with one_blas_thread_per_task():
        if solver == "gram":
            parts = map_reduce(cached_gram, cache.x, cache.row_factors, combine=operator.add, **cache.kernel_args)
            return FittedPCA(*svd_from_gram(compute(parts)[0], n_components), solver, 1)
        loadings, singular_values, passes = _block_krylov(cache, n_genes, n_components, seed)
        return FittedPCA(loadings, singular_values, solver, passes)


def _block_krylov(cache: GeneCache, n_genes: int, n_components: int, seed: int):
    """Block Krylov iterations on ``M = S^T S`` until the top Ritz pairs are eigenpairs to a tolerance.

    The tolerance is :data:`KRYLOV_TOLERANCE`, on the largest residual norm relative to the top Ritz
    value. Pass j computes ``T_j = M W_j`` for the newest basis block ``W_j``; with the basis
    ``V = [W_0 .. W_j]`` and ``T = [T_0 .. T_j]``, ``V^T T = V^T M V`` is the Rayleigh-Ritz matrix,
    so the Ritz pairs, and their residuals ``T y - theta V y``, are known after every pass without
    one of their own. The next block is ``T_j`` orthonormalized against ``V``.
    """
    block = min(n_components + KRYLOV_OVERSAMPLING, n_genes)
    w = np.linalg.qr(np.random.default_rng(seed).normal(size=(n_genes, block)))[0]
    basis, images = [w], []
    for _ in range(KRYLOV_MAX_ITERATIONS):
        image = map_reduce(
            cached_apply_gram, cache.x, cache.row_factors, combine=operator.add, w=w, **cache.kernel_args
        )
        images.append(compute(image)[0])
        v, t = np.hstack(basis), np.hstack(images)
        h = v.T @ t
        evals, evecs = top_eigenpairs((h + h.T) / 2.0, n_components)
        # residuals ||M u - theta u|| of the Ritz pairs (u = V y, M u = T y): no pass of their own
        residual = np.linalg.norm(t @ evecs - (v @ evecs) * evals, axis=0).max() / max(evals[0], 1e-300)
        if residual < KRYLOV_TOLERANCE:
            break
        if v.shape[1] + block > n_genes:  # the Krylov space is the whole gene space
            break
        w = images[-1]
        for _ in range(2):  # orthogonalize twice against the basis (Gram-Schmidt, re-orthogonalized)
            w = w - v @ (v.T @ w)
        if np.linalg.norm(w) <= 1e-10 * np.linalg.norm(images[-1]):  # the space is exhausted (low rank)
            break
        w = np.linalg.qr(w)[0]
        basis.append(w)
    logger.info("block Krylov PCA: %d passes", len(images))
    return orient(v @ evecs), np.sqrt(evals), len(images)
