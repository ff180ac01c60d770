"""Symphony's reference compression: the terms that let queries be mapped without reference cells.

From the corrected embedding ``Z_corr`` and the soft assignments ``R`` (paper, Methods):

- ``N_r = sum_i R_ik`` (k,), the size of each cluster;
- ``C = R^T Z_corr`` (k x d), the second compression term;
- ``Y_cos``: the L2-normalized columns of ``Z_corr^T R = C^T`` (d x k), the centroids used to
  soft-assign query cells;

and, for the per-cell mapping metric, the R-weighted moments of the pre-Harmony PCs ``Z``:
``sum R^2`` (k,), ``sum R z`` (k x d) and ``sum R z z^T`` (k x d x d).

All are sums over cells: :func:`compression_sums` is the kernel for one chunk, and
:meth:`CompressionSums.merge` adds two chunks' sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from symphony_dask._harmony.kernels import cosine_normalize
from symphony_dask._reference.model import ClusterMoments


@dataclass
class CompressionSums:
    """Sums over cells that define the compression terms and the PC moments per cluster."""

    cluster_sizes: np.ndarray
    compression: np.ndarray
    weight_sq: np.ndarray
    first: np.ndarray
    second: np.ndarray

    def merge(self, other: CompressionSums) -> CompressionSums:
        return CompressionSums(
            self.cluster_sizes + other.cluster_sizes,
            self.compression + other.compression,
            self.weight_sq + other.weight_sq,
            self.first + other.first,
            self.second + other.second,
        )

    @property
    def centroids(self) -> np.ndarray:
        """``Y_cos``: L2-normalized columns of ``Z_corr^T R`` (d x k)."""
        return cosine_normalize(self.compression.T, axis=0)

    @property
    def pca_moments(self) -> ClusterMoments:
        return ClusterMoments(self.weight_sq, self.first, self.second)


def compression_sums(z_orig: np.ndarray, z_corr: np.ndarray, r: np.ndarray) -> CompressionSums:
    """Kernel.

    The compression sums of one chunk of cells (no temporary the size of ``r``: a Harmony chunk holds up to
    250,000 cells).
    """
    second = np.stack([(z_orig * r[:, j, None]).T @ z_orig for j in range(r.shape[1])])
    return CompressionSums(
        cluster_sizes=r.sum(axis=0),
        compression=r.T @ z_corr,
        weight_sq=np.einsum("ik,ik->k", r, r),
        first=r.T @ z_orig,
        second=second,
    )
