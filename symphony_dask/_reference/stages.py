"""The stages of a reference build, each a function that returns a small dataclass.

:func:`~symphony_dask.build_reference` runs them in order (paper, Algorithm 1):

1. :func:`read_cells`: the expression, lazily, with the checks that need no pass;
2. :func:`first_moments`: value checks and per-group gene moments of the normalized values, one pass;
3. :func:`choose_genes`: variable genes per group (VST or mean.var.plot), pooled, and their scaling;
4. :func:`principal_components`: the PCA of the scaled chosen genes and the projection of every cell;
5. :func:`integrate`: Harmony over the batch keys (soft k-means without any), on chunks of the embedding;
6. :func:`compress`: ``N_r``, ``C``, ``Y_cos`` and the PC moments per cluster;
7. :func:`per_cell_parts`: the corrected embedding, its neighbor index and UMAP, when they are kept.

Passes over the expression matrix hold one chunk per task and reduce small statistics in a tree.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import dask.array as da
import numpy as np
import pandas as pd

from symphony_dask._dask.chunked import (
    advise,
    as_row_chunked,
    compute,
    map_reduce,
    map_rows,
    one_blas_thread_per_task,
    persist_now,
    tree_reduce,
)
from symphony_dask._dask.timing import timed
from symphony_dask._embedding.neighbors import EXACT_MAX_CELLS, NeighborIndex
from symphony_dask._embedding.umap_layout import UmapModel, fit_umap
from symphony_dask._harmony.harmonize import check_clusters, default_n_clusters, harmonize_with, soft_kmeans
from symphony_dask._harmony.result import HarmonyResult
from symphony_dask._harmony.settings import HarmonySettings
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
from symphony_dask._preprocessing.gene_cache import gene_cache
from symphony_dask._preprocessing.normalize import (
    ColumnSums,
    FirstPass,
    GroupMoments,
    column_sums,
    first_pass,
    has_counts,
    inverse_document_frequency,
)
from symphony_dask._preprocessing.pca import FittedPCA, PCASolver, cached_project, fit_cached_pca
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

logger = logging.getLogger("symphony_dask")

#: Harmony runs on chunks of at least this many cells (its per-cell state is small: d + k values),
#: as many as make one chunk group per worker of a cluster (``cluster.groups.MIN_GROUP_CELLS``).
HARMONY_CHUNK_SIZE = 50_000


@dataclass(frozen=True)
class BuildOptions:
    """What a build does besides Harmony: :func:`~symphony_dask.build_reference`'s other parameters."""

    normalize: bool | Literal["tfidf"] = True
    n_hvg: int | None = 2000
    hvg_batch_key: str | None = None
    n_pcs: int = 20
    n_clusters: int | None = None
    chunk_size: int | None = None
    layer: str | None = None
    obs_filter: str | None = None
    pca_solver: PCASolver = "auto"
    keep_embedding: bool = True
    neighbor_index: bool = True
    umap: bool = True
    variable_genes: Literal["vst", "mvp"] = "vst"
    additional_genes: Sequence[str] | None = None

    def check(self) -> None:
        """Raise for a value outside the choices of ``normalize`` or ``variable_genes``."""
        if self.normalize not in (True, False, "tfidf"):
            raise ValueError(f"{option('normalize', self.normalize)}: must be True, False or 'tfidf'")
        if self.variable_genes not in ("vst", "mvp"):
            raise ValueError(f"{option('variable_genes', self.variable_genes)}: must be 'vst' or 'mvp'")


@dataclass
class Cells:
    """Stage 1: the reference cells (lazily), their batch keys and the number of clusters."""

    expr: Expression
    keys: list[str]
    hvg_keys: list[str]
    additional_genes: list[str]
    n_clusters: int


def read_cells(data: AnnDataLike, batch_keys: str | Sequence[str] | None, options: BuildOptions) -> Cells:
    """Open the expression (filtered by ``obs_filter``) and check what needs no pass over it."""
    expr = read_expression(data, chunk_size=options.chunk_size, layer=options.layer)
    if options.obs_filter is not None:
        expr = keep_cells(expr, cells_where(expr.obs, options.obs_filter))
    advise(_memory_advice(expr))
    keys = as_key_list(batch_keys)
    check_obs_keys(expr.obs, keys)
    check_batch_values(expr.obs, keys)
    hvg_keys = as_key_list(options.hvg_batch_key)
    if len(hvg_keys) > 1:
        raise ValueError(f"{option('hvg_batch_key')} must name one obs column, got {hvg_keys}")
    check_obs_keys(expr.obs, hvg_keys, what=option("hvg_batch_key"))
    check_batch_values(expr.obs, hvg_keys, what=option("hvg_batch_key"))
    check_unique_genes(expr.genes, where="the reference")
    n = expr.n_cells
    _check_sizes(n, expr.X.shape[1], options.n_hvg, options.n_pcs)
    k = default_n_clusters(n) if options.n_clusters is None else int(options.n_clusters)
    check_clusters(k, n)
    return Cells(expr, keys, hvg_keys, _additional_genes(options.additional_genes, expr.genes), k)


@dataclass
class Moments:
    """Stage 2: the per-group gene moments of the cells that have counts, and each cell's group."""

    cells: Cells
    first: FirstPass
    idf: np.ndarray | None
    group_names: list[str]
    codes: da.Array


def first_moments(cells: Cells, options: BuildOptions, timings: dict[str, float]) -> Moments:
    """The first pass: value checks and per-group moments (a pass for the IDF before it with TF-IDF).

    Cells with zero total counts cannot be normalized: they are left out (with a warning) and the
    pass is run again without them.
    """
    expr, normalize = cells.expr, bool(options.normalize)
    group_names, codes = _groups(expr, cells.hvg_keys)
    codes_da = as_row_chunked(codes, expr.X)
    idf = None
    if options.normalize == "tfidf":  # Signac's IDF over the cells as given
        with timed(timings, "idf"):
            idf = inverse_document_frequency(compute(map_reduce(column_sums, expr.X, combine=ColumnSums.merge))[0])
    with timed(timings, "moments"):
        first: FirstPass = compute(
            map_reduce(first_pass, expr.X, codes_da, combine=FirstPass.merge, normalize=normalize, idf=idf)
        )[0]
    raise_on_bad_values(
        first.counts,
        where="the reference expression",
        normalize=normalize,
        warn_empty=False,
        layers=expr.layers if options.layer is None else (),
    )
    _check_some_expression(first.counts, expr.n_cells, expr.X.shape[1], options.layer)
    if normalize and first.counts.n_empty_cells:
        expr, first = _drop_empty_cells(expr, first.counts.n_empty_cells, cells.hvg_keys, idf, timings)
        _check_sizes(expr.n_cells, expr.X.shape[1], options.n_hvg, options.n_pcs)
        group_names, codes = _groups(expr, cells.hvg_keys)
        codes_da = as_row_chunked(codes, expr.X)
        cells = Cells(expr, cells.keys, cells.hvg_keys, cells.additional_genes, cells.n_clusters)
    return Moments(cells, first, idf, group_names, codes_da)


@dataclass
class GeneChoice:
    """Stage 3: the chosen genes (variable ones, then additional ones), their scaling and the table of scores."""

    genes: list[str]
    index: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    table: pd.DataFrame

    def scaling(self, normalize: bool, idf: np.ndarray | None) -> dict:
        """The arguments of :func:`~symphony_dask._preprocessing.normalize.scale` for the chosen genes."""
        return dict(genes=self.index, mean=self.mean, std=self.std, normalize=normalize, idf=idf)


def choose_genes(moments: Moments, options: BuildOptions, timings: dict[str, float]) -> GeneChoice:
    """Variable genes per group, pooled, plus the additional ones; means and SDs from the first pass."""
    expr, normalize = moments.cells.expr, bool(options.normalize)
    with timed(timings, "variable_genes"):
        if options.variable_genes == "mvp":
            group_moments = compute(
                map_reduce(
                    exp_moments, expr.X, moments.codes, combine=GroupMoments.merge, normalize=normalize, idf=moments.idf
                )
            )[0]
            table = mvp_table(group_moments, moments.group_names, expr.genes)
        else:
            table = _vst(expr, moments.first, moments.codes, moments.group_names, normalize, moments.idf)
        chosen = select_top(table, options.n_hvg)
        if len(chosen) <= 1:
            raise ValueError(f"only {len(chosen)} variable gene(s) found; the data look constant")
        chosen += [gene for gene in moments.cells.additional_genes if gene not in set(chosen)]
    index = expr.genes.get_indexer(chosen)
    total = moments.first.moments.total()
    mean, std = total.mean[index], np.sqrt(total.variance[index])
    constant = [gene for gene, sd in zip(chosen, std, strict=True) if sd == 0]
    if constant:
        raise ValueError(
            f"additional gene(s) {', '.join(constant[:5])} do not vary over the reference cells; "
            "a constant gene cannot be scaled: leave it out of additional_genes"
        )
    return GeneChoice(chosen, index, mean, std, table)


@dataclass
class PrincipalComponents:
    """Stage 4: the fitted PCA and every cell's PCs (in memory, or chunked on the workers)."""

    pca: FittedPCA
    z: np.ndarray | da.Array
    harmony_chunks: int | None
    gene_cache: dict


def principal_components(
    moments: Moments, genes: GeneChoice, options: BuildOptions, seed: int, timings: dict[str, float]
) -> PrincipalComponents:
    """The PCA of the scaled chosen genes, then a pass projecting every cell onto its loadings.

    One pass first keeps the chosen genes of every cell in a gene cache
    (:mod:`~symphony_dask._preprocessing.gene_cache`), which the PCA's passes and the projection read
    instead of the whole matrix; the cache is gone when the stage ends. Data held in memory gives an
    embedding in memory (NumPy Harmony, one chunk per thread); data read from disk keeps it chunked, on
    the workers of a cluster.
    """
    expr = moments.cells.expr
    nonzero = int(moments.first.moments.total().nonzero[genes.index].sum())
    normalize, idf = bool(options.normalize), moments.idf
    with ExitStack() as stack:
        with timed(timings, "gene_cache"):
            cache = gene_cache(
                expr.X, genes.index, genes.mean, genes.std, normalize=normalize, idf=idf, nonzero=nonzero
            )
            kept = stack.enter_context(cache)
        with timed(timings, "pca"):
            pca = fit_cached_pca(kept, options.n_pcs, solver=options.pca_solver, seed=seed)
        with timed(timings, "projection"), one_blas_thread_per_task():
            z = map_rows(cached_project, kept.x, kept.row_factors, n_out=options.n_pcs, loadings=pca.loadings,
                         **kept.kernel_args)  # fmt: skip
            z = persist_now(z)
    record = kept.record()
    if expr.in_memory:
        return PrincipalComponents(pca, z.compute(), None, record)
    return PrincipalComponents(pca, z, max(max(expr.X.chunks[0]), HARMONY_CHUNK_SIZE), record)


def integrate(
    cells: Cells, pcs: PrincipalComponents, settings: HarmonySettings, timings: dict[str, float]
) -> HarmonyResult:
    """Harmony over the batch keys; Symphony's soft k-means, without correction, when there are none."""
    with timed(timings, "harmony"):
        if cells.keys:
            result = harmonize_with(
                pcs.z, cells.expr.obs, cells.keys, settings, n_clusters=cells.n_clusters, chunk_size=pcs.harmony_chunks
            )
        else:
            s, chunks = settings, pcs.harmony_chunks
            result = soft_kmeans(
                pcs.z, cells.n_clusters, sigma=s.sigma, n_init=s.n_init, seed=s.seed, chunk_size=chunks
            )
    timings.update({f"harmony {name}": seconds for name, seconds in result.timings_s.items()})
    return result


def compress(
    cells: Cells, pcs: PrincipalComponents, result: HarmonyResult, timings: dict[str, float]
) -> CompressionSums:
    """The compression terms (``N_r``, ``C``, ``Y_cos``) and the PC moments per cluster."""
    with timed(timings, "compression"), one_blas_thread_per_task():
        if cells.expr.in_memory:
            return compression_sums(pcs.z, result.Z_corr, result.R)
        # each task sums one Harmony piece, its R made in the task: never a whole chunk's R
        parts = result.map_assignment_pieces(compression_sums, pcs.z, result.Z_corr)
        return compute(tree_reduce(parts, CompressionSums.merge))[0]


@dataclass
class CellParts:
    """Stage 7: the corrected embedding, its neighbor index and UMAP (each ``None`` when not kept)."""

    embedding: np.ndarray | None
    neighbors: NeighborIndex | None
    layout: UmapModel | None


def per_cell_parts(result: HarmonyResult, options: BuildOptions, seed: int, timings: dict[str, float]) -> CellParts:
    """The per-cell parts kept with the reference.

    The embedding is brought here once (d floats per cell), so that the reference outlives a cluster;
    the neighbor index is built now above :data:`EXACT_MAX_CELLS` cells, so that it is saved with it.
    """
    if not options.keep_embedding:
        return CellParts(None, None, None)
    embedding = np.asarray(result.Z_corr)
    neighbors = layout = None
    if options.neighbor_index and len(embedding) > EXACT_MAX_CELLS:
        with timed(timings, "neighbor_index"):
            neighbors = NeighborIndex.build(embedding, seed=seed)
    if options.umap:
        with timed(timings, "umap"):
            layout = fit_umap(embedding, seed=seed)
    return CellParts(embedding, neighbors, layout)


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
    """VST per group (loess on the moments.

    Then, only if some value reaches the clip, a pass for the clipped standardized variances): its table.
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
        settings = dict(mean=mean, sd=sd, clip=clip, normalize=normalize, idf=idf)
        squares = compute(map_reduce(clipped_squares, expr.X, codes_da, combine=ClippedSquares.merge, **settings))[0]
    else:
        logger.info(
            "variable genes: no value reaches the clip of sqrt(%d cells); standardized variances from "
            "the moments, without a pass of their own",
            expr.n_cells,
        )
    return vst_table(first.moments, squares, expected, group_names, expr.genes)
