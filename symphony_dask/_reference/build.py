"""Building a Symphony reference (paper, Algorithm 1): :func:`build_reference`.

The build is a sequence of stages (:mod:`symphony_dask._reference.stages`), each a pass or two of
chunk kernels over the matrix that reduces small statistics in a tree; Harmony's settings travel as
one :class:`~symphony_dask._harmony.settings.HarmonySettings`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from symphony_dask import __version__
from symphony_dask._dask.chunked import failure_advice
from symphony_dask._harmony.settings import Flavor, HarmonySettings, fields_of
from symphony_dask._io.expression import AnnDataLike
from symphony_dask._io.validation import as_key_list
from symphony_dask._preprocessing.pca import PCASolver
from symphony_dask._reference.model import Reference
from symphony_dask._reference.stages import (
    BuildOptions,
    choose_genes,
    compress,
    first_moments,
    integrate,
    per_cell_parts,
    principal_components,
    read_cells,
)


def build_reference(
    data: AnnDataLike,
    batch_keys: str | Sequence[str] | None = None,
    *,
    normalize: bool | Literal["tfidf"] = True,
    n_hvg: int | None = 2000,
    hvg_batch_key: str | None = None,
    n_pcs: int = 20,
    n_clusters: int | None = None,
    theta: float | Sequence[float] = 2.0,
    tau: float | Sequence[float] = 0.0,
    sigma: float = 0.1,
    lamb: float | Sequence[float] | None = None,
    max_iter_harmony: int | None = None,
    seed: int = 111,
    chunk_size: int | None = None,
    layer: str | None = None,
    obs_filter: str | None = None,
    block_size: float = 0.05,
    max_iter_cluster: int | None = None,
    epsilon_cluster: float | None = None,
    epsilon_harmony: float | None = None,
    n_init: int | None = None,
    harmony_flavor: Flavor = "harmony1",
    alpha: float | None = None,
    batch_prop_cutoff: float | None = None,
    pca_solver: PCASolver = "auto",
    keep_embedding: bool = True,
    neighbor_index: bool = True,
    umap: bool = True,
    variable_genes: Literal["vst", "mvp"] = "vst",
    additional_genes: Sequence[str] | None = None,
) -> Reference:
    """Build a Symphony reference from an expression matrix.

    Parameters
    ----------
    data
        Cells x genes expression: an AnnData (in memory or backed) or a path to ``.h5ad``/``.zarr``.
        Raw counts with ``normalize=True``; log(CP10K+1) values with ``normalize=False``.
    batch_keys
        ``obs`` column(s) to integrate over with Harmony. With none, the reference is clustered by
        soft k-means and not corrected, as R Symphony does. Each key must name groups of cells
        (donors, samples): a column with more than 100 distinct values, fewer than two cells per
        value on average, is refused, as are values of different types that read the same as text
        (``1`` and ``'1'``), which would be merged (:func:`~symphony_dask._io.validation.check_batch_values`).
    normalize
        ``True``: log(CP10K+1)-normalize the counts (on the fly, chunk by chunk). ``'tfidf'``: for
        (binarized) peak x cell matrices, ``log(1 + TF x IDF x 1e4)`` as Signac's ``RunTFIDF``
        (method 1), with ``TF = x / cell total`` and ``IDF = n_cells / peak total`` over the
        reference cells (one more pass); the IDF of the chosen peaks is kept in the reference
        (:attr:`Reference.idf`) and applied to queries. ``False``: the values are used as given.
    n_hvg
        Number of variable genes per ``hvg_batch_key`` group (R's ``topn``); ``None`` keeps every
        gene that varies (``'mvp'``: every gene that passes its cut-offs).
    hvg_batch_key
        ``obs`` column whose groups each contribute their top ``n_hvg`` genes (R's ``vargenes_groups``).
    n_pcs
        Number of principal components ``d``.
    n_clusters
        Number of soft clusters ``k``; default ``min(100, round(n / 30))``.
    theta, tau, sigma, lamb
        Harmony's diversity penalty, its small-batch discount, the soft k-means entropy
        regularization and the ridge penalty (one value, or one per batch key where allowed;
        ``lamb``: 1 for harmony1, estimated for harmony2, see :func:`symphony_dask.harmonize`).
    max_iter_harmony
        Maximum Harmony iterations: 20 for harmony1 (as R Symphony), 10 for harmony2 (harmonypy's).
    seed
        Seeds the k-means start and Harmony's block order.
    chunk_size
        Cells per chunk of the expression matrix; ``None``: in-memory data of up to 10,000 cells is
        one chunk, larger in-memory data chunks of 10,000 cells (never densified whole, every core
        busy), data on disk as many cells as a task's memory holds (at most 10,000). The result
        does not depend on it beyond round-off.
    layer
        Use this AnnData layer instead of ``X``.
    obs_filter
        Build from the cells for which this filter over ``obs`` columns is true, e.g.
        ``"donor != 'd7' & n_genes > 500"``: column names, literals, comparisons, ``in`` lists,
        ``& | ~`` (or ``and or not``) and parentheses, parsed and evaluated without running code
        (:mod:`symphony_dask._io.obs_filter`); the other cells are skipped chunk by chunk, never read
        into one array.
    block_size, max_iter_cluster, epsilon_cluster, epsilon_harmony, n_init, alpha, batch_prop_cutoff
        Further Harmony settings (see :func:`symphony_dask.harmonize`; ``None``: the flavor's default).
    harmony_flavor
        ``'harmony1'`` (harmony 0.1, as the Symphony paper and R Symphony) or ``'harmony2'`` (R
        harmony 2.0 and harmonypy 2.1, with their defaults). Queries map onto either the same way.
    pca_solver
        ``'gram'`` (exact, one pass, cost ~ genes^2 per cell), ``'krylov'`` (randomized block Krylov,
        10-20 passes, cost ~ genes per cell) or ``'auto'``: the cheaper (Gram up to ~5,000 genes).
    keep_embedding
        Keep the corrected per-cell embedding, ``obs`` and ``obsm`` (needed to transfer annotations).
        The embedding (cells x ``n_pcs`` floats: 160 MB per million cells with 20 PCs) is brought
        from the workers of a cluster when the build ends, so the reference stays usable after the
        cluster closes.
    neighbor_index
        Above 20,000 cells, gather the embedding once to build the HNSW index that label transfer
        uses, kept (and saved) with the reference. It is built on one thread, so that a rebuilt
        reference has the same graph; ``False`` leaves it to
        the first label transfer (:meth:`Reference.neighbor_index`), and unsaved until the
        reference is saved after it.
    umap
        Fit a UMAP of the corrected embedding (R Symphony's ``do_umap``: 30 neighbors, cosine,
        min_dist 0.1, seeded by ``seed``), kept as :attr:`Reference.umap`; mapped queries are placed
        into it. Above 20,000 cells it is fitted on a seeded subsample of 20,000 and the other cells
        are placed like query cells (:mod:`symphony_dask._embedding.umap_layout`). Needs ``keep_embedding``.

    variable_genes
        ``'vst'`` (R Symphony's default) or ``'mvp'`` (mean.var.plot with R Symphony's cut-offs:
        20 bins of the log mean, log mean >= 0.1, dispersion >= 0; see
        :mod:`symphony_dask._preprocessing.variable_genes`).
    additional_genes
        Genes always kept beside the variable ones (R's ``additional_genes``, e.g. markers),
        appended in the order given.

    Returns
    -------
    Reference
    """
    with failure_advice():
        options = BuildOptions(**fields_of(BuildOptions, locals()))
        options.check()
        # resolved before any pass over the data, so that the reference records what was run
        settings = HarmonySettings.from_arguments(locals(), flavor=harmony_flavor)
        settings = settings.resolved(len(as_key_list(batch_keys)))
        timings: dict[str, float] = {}
        cells = read_cells(data, batch_keys, options)
        moments = first_moments(cells, options, timings)
        cells = moments.cells  # without cells that have no counts
        genes = choose_genes(moments, options, timings)
        pcs = principal_components(moments, genes, options, settings.seed, timings)
        result = integrate(cells, pcs, settings, timings)
        sums = compress(cells, pcs, result, timings)
        parts = per_cell_parts(result, options, settings.seed, timings)
        params = dict(
            batch_keys=cells.keys,
            normalize=normalize,
            n_hvg=n_hvg,
            hvg_batch_key=hvg_batch_key,
            n_pcs=n_pcs,
            obs_filter=obs_filter,
            n_clusters=cells.n_clusters,
            **settings.params(),
            n_cells=cells.expr.n_cells,
            n_variable_genes=len(genes.genes),
            variable_genes=variable_genes,
            additional_genes=cells.additional_genes,
            singular_values=pcs.pca.singular_values,
            pca_solver=pcs.pca.solver,
            pca_passes=pcs.pca.passes,
            gene_cache=pcs.gene_cache,
            harmony_iterations=result.n_iter,
            harmony_converged=result.converged,
            harmony_cluster_iterations=result.cluster_iterations,
            timings_s=timings,
            symphony_dask_version=__version__,
        )
        return Reference(
            genes=genes.genes,
            mean=genes.mean,
            std=genes.std,
            loadings=pcs.pca.loadings,
            centroids=sums.centroids,
            cluster_sizes=sums.cluster_sizes,
            compression=sums.compression,
            embedding=parts.embedding,
            obs=cells.expr.obs.copy() if keep_embedding else None,
            obsm=dict(cells.expr.obsm) if keep_embedding else {},
            pca_moments=sums.pca_moments,
            params=params,
            variable_gene_table=genes.table,
            neighbors=parts.neighbors,
            umap_layout=parts.layout,
            idf=None if moments.idf is None else moments.idf[genes.index],
            sources=(Path(data),) if isinstance(data, (str, os.PathLike)) else (),
        )
