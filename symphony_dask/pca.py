"""PCA of the scaled reference without densifying it: truncated SVD from a tree-reduced Gram matrix.

Symphony takes the truncated SVD ``G_rs = U Sigma V^T`` of the scaled genes x cells matrix (no
re-centering after the clip) and keeps the loadings ``U`` (genes x d); the reference embedding is
``Z = U^T G_rs`` (here cells x d: ``Z = X_scaled U``).

The exact path accumulates ``X_scaled^T X_scaled`` (genes x genes) over row chunks, each chunk
densified on its own, and takes its top eigenvectors: ``U`` are the eigenvectors and the singular
values are the square roots of the eigenvalues.

Sign convention: each component is oriented so that its largest-magnitude loading is positive, so
that a rebuilt reference is identical to the first.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .preprocess import Block, scale


def gram(block: Block, genes: np.ndarray, mean: np.ndarray, std: np.ndarray, *, normalize: bool) -> np.ndarray:
    """Kernel: ``S^T S`` of the scaled chosen genes ``S`` of one chunk (genes x genes)."""
    s = scale(block, genes, mean, std, normalize=normalize)
    return s.T @ s


def project(block: Block, genes: np.ndarray, mean: np.ndarray, std: np.ndarray, loadings: np.ndarray, *,
            normalize: bool) -> np.ndarray:
    """Kernel: PC embedding ``scale(block) @ loadings`` of one chunk (cells x d)."""
    return scale(block, genes, mean, std, normalize=normalize) @ loadings


def orient(loadings: np.ndarray) -> np.ndarray:
    """Flip each column so that its entry of largest magnitude is positive."""
    idx = np.argmax(np.abs(loadings), axis=0)
    signs = np.sign(loadings[idx, np.arange(loadings.shape[1])])
    signs[signs == 0] = 1.0
    return loadings * signs


def svd_from_gram(gram_matrix: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top ``n_components`` left singular vectors (oriented) and singular values from a Gram matrix."""
    g = gram_matrix.shape[0]
    if not 0 < n_components <= g:
        raise ValueError(f"cannot take {n_components} principal components of {g} genes")
    evals, evecs = scipy.linalg.eigh(gram_matrix, subset_by_index=(g - n_components, g - 1))
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    return orient(evecs), np.sqrt(np.clip(evals, 0.0, None))
