"""Building a Symphony reference (paper, Algorithm 1) as passes of chunk kernels over the matrix.

1. first pass: value checks and per-group gene moments of the log-normalized values;
2. VST: loess per group, then a pass for the standardized variances; top genes per group, pooled;
3. scaling statistics of the chosen genes from the same moments (no extra pass);
4. PCA: a pass accumulating the Gram matrix of the scaled genes, then a projection pass;
5. Harmony over the batch variables (soft k-means when there are none), on chunks of the embedding;
6. compression: ``N_r``, ``C``, ``Y_cos`` and the PC moments per cluster.

Passes over the expression matrix hold one chunk per task and reduce small statistics in a tree.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask import __version__
from symphony_dask._dask.chunked import (
    advise,
    as_row_chunked,
    compute,
    failure_advice,
    map_reduce,
    map_rows,
    one_blas_thread_per_task,
    persist_now,
    tree_reduce,
)
from symphony_dask._dask.timing import timed
from symphony_dask._embedding.neighbors import EXACT_MAX_CELLS, NeighborIndex
from symphony_dask._embedding.umap_layout import fit_umap
from symphony_dask._harmony.harmonize import (
    Flavor,
    check_clusters,
    check_harmony_settings,
    default_n_clusters,
    flavor_settings,
    harmonize,
    soft_kmeans,
)
from symphony_dask._io.expression import AnnDataLike, Expression, keep_cells, memory_per_task, read_expression
from symphony_dask._io.obs_filter import cells_where
from symphony_dask._io.validation import (
    ValueCounts,
    as_key_list,
    check_batch_values,
    check_obs_keys,
    check_unique_genes,
    option,
    raise_on_bad_values,
)
from symphony_dask._preprocessing.normalize import (
    ColumnSums,
    FirstPass,
    GroupMoments,
    column_sums,
    first_pass,
    has_counts,
    inverse_document_frequency,
)
from symphony_dask._preprocessing.pca import PCASolver, fit_pca, project
from symphony_dask._preprocessing.variable_genes import (
    ClippedSquares,
    clip_reached,
    clipped_squares,
    exp_moments,
    expected_variance,
    mvp_table,
    select_top,
    vst_table,
)
from symphony_dask._reference.compression import CompressionSums, compression_sums
from symphony_dask._reference.model import Reference

logger = logging.getLogger("symphony_dask")

#: Harmony runs on chunks of at least this many cells (its per-cell state is small: d + k values),
#: as many as make one chunk group per worker of a cluster (harmony_groups.MIN_GROUP_CELLS).
HARMONY_CHUNK_SIZE = 50_000


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
        Build from the cells for which this expression over ``obs`` columns is true (pandas
        :meth:`~pandas.DataFrame.query` syntax, e.g. ``"donor != 'd7' and n_genes > 500"``); the
        other cells are skipped chunk by chunk, never read into one array.
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
        reference has the same graph (about 3.5 min for 1.4M cells here); ``False`` leaves it to
        the first label transfer (:meth:`Reference.neighbor_index`), and unsaved until the
        reference is saved after it.
    umap
        Fit a UMAP of the corrected embedding (R Symphony's ``do_umap``: 30 neighbours, cosine,
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
        return _build_reference(**locals())


def _build_reference(
    data,
    batch_keys,
    *,
    normalize,
    n_hvg,
    hvg_batch_key,
    n_pcs,
    n_clusters,
    theta,
    tau,
    sigma,
    lamb,
    max_iter_harmony,
    seed,
    chunk_size,
    layer,
    obs_filter,
    block_size,
    max_iter_cluster,
    epsilon_cluster,
    epsilon_harmony,
    n_init,
    harmony_flavor,
    alpha,
    batch_prop_cutoff,
    pca_solver,
    keep_embedding,
    neighbor_index,
    umap,
    variable_genes,
    additional_genes,
) -> Reference:
    timings: dict[str, float] = {}
    if normalize not in (True, False, "tfidf"):
        raise ValueError(f"{option('normalize', normalize)}: must be True, False or 'tfidf'")
    if variable_genes not in ("vst", "mvp"):
        raise ValueError(f"{option('variable_genes', variable_genes)}: must be 'vst' or 'mvp'")
    # resolved here, before any pass over the data, so that the reference records what was run
    harmony_settings = flavor_settings(
        harmony_flavor,
        lamb=lamb,
        max_iter_cluster=max_iter_cluster,
        epsilon_cluster=epsilon_cluster,
        epsilon_harmony=epsilon_harmony,
        n_init=n_init,
        alpha=alpha,
        batch_prop_cutoff=batch_prop_cutoff,
    )
    if max_iter_harmony is None:
        max_iter_harmony = 20 if harmony_flavor == "harmony1" else 10
    check_harmony_settings(
        len(as_key_list(batch_keys)),
        theta=theta,
        tau=tau,
        sigma=sigma,
        block_size=block_size,
        max_iter_harmony=max_iter_harmony,
        **harmony_settings,
    )
    expr = read_expression(data, chunk_size=chunk_size, layer=layer)
    if obs_filter is not None:
        expr = keep_cells(expr, cells_where(expr.obs, obs_filter))
    advise(_memory_advice(expr))
    keys = as_key_list(batch_keys)
    check_obs_keys(expr.obs, keys)
    check_batch_values(expr.obs, keys)
    hvg_keys = as_key_list(hvg_batch_key)
    if len(hvg_keys) > 1:
        raise ValueError(f"{option('hvg_batch_key')} must name one obs column, got {hvg_keys}")
    check_obs_keys(expr.obs, hvg_keys, what=option("hvg_batch_key"))
    check_batch_values(expr.obs, hvg_keys, what=option("hvg_batch_key"))
    check_unique_genes(expr.genes, where="the reference")
    n = expr.n_cells
    _check_sizes(n, expr.X.shape[1], n_hvg, n_pcs)
    k = default_n_clusters(n) if n_clusters is None else int(n_clusters)
    check_clusters(k, n)

    group_names, codes = _groups(expr, hvg_keys)
    codes_da = as_row_chunked(codes, expr.X)

    extra = _additional_genes(additional_genes, expr.genes)
    idf = None
    if normalize == "tfidf":  # Signac's IDF over the cells as given
        with timed(timings, "idf"):
            idf = inverse_document_frequency(compute(map_reduce(column_sums, expr.X, combine=ColumnSums.merge))[0])
    with timed(timings, "moments"):
        first: FirstPass = compute(
            map_reduce(first_pass, expr.X, codes_da, combine=FirstPass.merge, normalize=bool(normalize), idf=idf)
        )[0]
    raise_on_bad_values(
        first.counts,
        where="the reference expression",
        normalize=bool(normalize),
        warn_empty=False,
        layers=expr.layers if layer is None else (),
    )
    _check_some_expression(first.counts, n, expr.X.shape[1], layer)
    if normalize and first.counts.n_empty_cells:
        expr, first = _drop_empty_cells(expr, first.counts.n_empty_cells, hvg_keys, idf, timings)
        n = expr.n_cells
        _check_sizes(n, expr.X.shape[1], n_hvg, n_pcs)
        group_names, codes = _groups(expr, hvg_keys)
        codes_da = as_row_chunked(codes, expr.X)

    with timed(timings, "variable_genes"):
        if variable_genes == "mvp":
            moments = compute(
                map_reduce(
                    exp_moments, expr.X, codes_da, combine=GroupMoments.merge, normalize=bool(normalize), idf=idf
                )
            )[0]
            table = mvp_table(moments, group_names, expr.genes)
        else:
            table = _vst(expr, first, codes_da, group_names, bool(normalize), idf)
        chosen = select_top(table, n_hvg)
        if len(chosen) <= 1:
            raise ValueError(f"only {len(chosen)} variable gene(s) found; the data look constant")
        chosen += [gene for gene in extra if gene not in set(chosen)]
    gene_idx = expr.genes.get_indexer(chosen)
    total = first.moments.total()
    mean = total.mean[gene_idx]
    std = np.sqrt(total.variance[gene_idx])
    constant = [gene for gene, sd in zip(chosen, std) if sd == 0]
    if constant:
        raise ValueError(
            f"additional gene(s) {', '.join(constant[:5])} do not vary over the reference cells; "
            "a constant gene cannot be scaled: leave it out of additional_genes"
        )

    scaling = dict(genes=gene_idx, mean=mean, std=std, normalize=bool(normalize), idf=idf)
    with timed(timings, "pca"):
        pca = fit_pca(expr.X, scaling, n_pcs, solver=pca_solver, seed=seed)
        loadings = pca.loadings
        with one_blas_thread_per_task():
            z = persist_now(map_rows(project, expr.X, n_out=n_pcs, loadings=loadings, **scaling))

    # data held in memory: the embedding is small and in memory too (NumPy Harmony, one chunk per
    # thread); data read from disk: it stays chunked, on the workers of a cluster
    if expr.in_memory:
        z, harmony_chunks = z.compute(), None
    else:
        harmony_chunks = max(max(expr.X.chunks[0]), HARMONY_CHUNK_SIZE)
    with timed(timings, "harmony"):
        if keys:
            res = harmonize(
                z,
                expr.obs,
                keys,
                n_clusters=k,
                theta=theta,
                tau=tau,
                sigma=sigma,
                block_size=block_size,
                max_iter_harmony=max_iter_harmony,
                seed=seed,
                chunk_size=harmony_chunks,
                flavor=harmony_flavor,
                **harmony_settings,
            )
        else:
            res = soft_kmeans(
                z, k, sigma=sigma, n_init=harmony_settings["n_init"], seed=seed, chunk_size=harmony_chunks
            )

    timings.update({f"harmony {name}": seconds for name, seconds in res.timings_s.items()})
    with timed(timings, "compression"), one_blas_thread_per_task():
        if expr.in_memory:
            sums = compression_sums(z, res.Z_corr, res.R)
        else:
            # each task sums one Harmony piece, its R made in the task: never a whole chunk's R
            parts = res.map_assignment_pieces(compression_sums, z, res.Z_corr)
            sums = compute(tree_reduce(parts, CompressionSums.merge))[0]
    embedding = None
    if keep_embedding:  # brought here once (d floats per cell), so the reference outlives a cluster
        embedding = np.asarray(res.Z_corr)

    if neighbor_index and keep_embedding and n > EXACT_MAX_CELLS:  # built once here, saved with the reference
        with timed(timings, "neighbor_index"):
            neighbors = NeighborIndex.build(embedding, seed=seed)
    else:
        neighbors = None
    layout = None
    if umap and keep_embedding:
        with timed(timings, "umap"):
            layout = fit_umap(embedding, seed=seed)

    params = dict(
        batch_keys=keys,
        normalize=normalize,
        n_hvg=n_hvg,
        hvg_batch_key=hvg_batch_key,
        n_pcs=n_pcs,
        obs_filter=obs_filter,
        n_clusters=k,
        theta=theta,
        tau=tau,
        sigma=sigma,
        max_iter_harmony=max_iter_harmony,
        seed=seed,
        block_size=block_size,
        harmony_flavor=harmony_flavor,
        **harmony_settings,
        n_cells=n,
        n_variable_genes=len(chosen),
        variable_genes=variable_genes,
        additional_genes=extra,
        singular_values=pca.singular_values,
        pca_solver=pca.solver,
        pca_passes=pca.passes,
        harmony_iterations=res.n_iter,
        harmony_converged=res.converged,
        harmony_cluster_iterations=res.cluster_iterations,
        timings_s=timings,
        symphony_dask_version=__version__,
    )
    return Reference(
        genes=chosen,
        mean=mean,
        std=std,
        loadings=loadings,
        centroids=sums.centroids,
        cluster_sizes=sums.cluster_sizes,
        compression=sums.compression,
        embedding=embedding,
        obs=expr.obs.copy() if keep_embedding else None,
        obsm=dict(expr.obsm) if keep_embedding else {},
        pca_moments=sums.pca_moments,
        params=params,
        variable_gene_table=table,
        neighbors=neighbors,
        umap_layout=layout,
        idf=None if idf is None else idf[gene_idx],
        sources=(Path(data),) if isinstance(data, (str, os.PathLike)) else (),
    )


def _memory_advice(expr: Expression) -> str:
    rows = int(max(expr.X.chunks[0]))
    return (
        f"The matrix is read in chunks of {rows:,} cells x {expr.X.shape[1]:,} genes, with "
        f"{memory_per_task() / 2**30:.1f} GiB of memory per task: pass a smaller chunk size "
        f"(e.g. {option('chunk_size', max(rows // 4, 100))}) or give the workers more memory."
    )


def _drop_empty_cells(
    expr: Expression, n_empty: int, hvg_keys: list[str], idf: np.ndarray | None, timings: dict[str, float]
) -> tuple[Expression, FirstPass]:
    """Leave out cells with zero total counts (they cannot be normalized) and redo the first pass."""
    warnings.warn(
        f"{n_empty} of {expr.n_cells} reference cells have zero total counts and are left out of the "
        "reference (they cannot be normalized)",
        UserWarning,
        stacklevel=3,
    )
    keep = da.map_blocks(has_counts, expr.X, drop_axis=1, dtype=bool).compute()
    expr = keep_cells(expr, keep)
    _, codes = _groups(expr, hvg_keys)
    with timed(timings, "moments"):
        first = compute(
            map_reduce(
                first_pass, expr.X, as_row_chunked(codes, expr.X), combine=FirstPass.merge, normalize=True, idf=idf
            )
        )[0]
    return expr, first


def _check_sizes(n_cells: int, n_genes: int, n_hvg: int | None, n_pcs: int) -> None:
    if n_hvg is not None and (int(n_hvg) != n_hvg or n_hvg < 1):
        raise ValueError(f"n_hvg must be a positive integer or None, got {n_hvg!r}")
    if int(n_pcs) != n_pcs or n_pcs < 1:
        raise ValueError(f"n_pcs must be a positive integer, got {n_pcs!r}")
    if n_pcs >= min(n_cells, n_genes):
        raise ValueError(f"n_pcs={n_pcs} must be smaller than the number of cells ({n_cells}) and genes ({n_genes})")


def _check_some_expression(counts: ValueCounts, n_cells: int, n_genes: int, layer: str | None) -> None:
    """Raise when every cell's values sum to zero: the (non-negative) matrix holds no nonzero value."""
    if counts.n_empty_cells == n_cells:
        read = f"layer {layer!r}" if layer is not None else "X"
        raise ValueError(
            f"the reference expression matrix ({n_cells} cells x {n_genes} genes, read from {read}) has no nonzero "
            f"value, so no gene varies and there is nothing to build a reference from; check that the matrix read "
            f"holds the expression (if it is in a layer, pass its name as {option('layer')})"
        )


def _groups(expr: Expression, hvg_keys: list[str]) -> tuple[list[str], np.ndarray]:
    """Group names (sorted, as R's ``split`` orders them) and each cell's group code."""
    if not hvg_keys:
        return ["all"], np.zeros(expr.n_cells, dtype=np.int64)
    names, codes = np.unique(expr.obs[hvg_keys[0]].astype(str).to_numpy(), return_inverse=True)
    return [str(x) for x in names], codes.ravel().astype(np.int64)


def _additional_genes(genes: Sequence[str] | None, available: pd.Index) -> list[str]:
    """The additional genes, checked against the data's genes."""
    if genes is None:
        return []
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    missing = [g for g in genes if g not in available]
    if missing:
        raise ValueError(
            f"additional_genes {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            f"are not genes of the reference data (its genes look like {', '.join(available[:3])})"
        )
    return list(dict.fromkeys(genes))


def _vst(expr, first, codes_da, group_names, normalize, idf):
    """VST per group (loess on the moments; then, only if some value reaches the clip, a pass for
    the clipped standardized variances): its table.
    """
    expected, mean, sd = {}, {}, {}
    for code, name in enumerate(group_names):
        m = first.moments.groups[code]
        try:
            expected[code] = expected_variance(m.mean, m.variance)
        except ValueError as err:
            raise ValueError(f"variable genes of group {name!r}: {err}") from err
        mean[code], sd[code] = m.mean, np.sqrt(expected[code])
    clip = float(np.sqrt(expr.n_cells))
    squares = None
    if any(clip_reached(first.moments.groups[code], sd[code], clip) for code in sd):
        squares = compute(
            map_reduce(
                clipped_squares,
                expr.X,
                codes_da,
                combine=ClippedSquares.merge,
                mean=mean,
                sd=sd,
                clip=clip,
                normalize=normalize,
                idf=idf,
            )
        )[0]
    else:
        logger.info(
            "variable genes: no value reaches the clip of sqrt(%d cells); standardized variances from "
            "the moments, without a pass of their own",
            expr.n_cells,
        )
    return vst_table(first.moments, squares, expected, group_names, expr.genes)
