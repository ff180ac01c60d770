"""Plots of a reference and its mapped queries (matplotlib; scanpy-like ``color=``, ``ax=``, returning the Axes).

- :func:`reference`: the reference UMAP as density contours per label, labels at their centres
  (R Symphony's ``plotReference(as.density=TRUE)``), or as points;
- :func:`mapping`: query cells over the grey density of the reference;
- :func:`confusion`: row-normalized confusion matrix of true against predicted labels;
- :func:`mapping_scores`: the per-cell mapping metric per (predicted) cell type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.axes import Axes

    from .reference import Reference

#: Reference cells per label drawn into a density estimate (a seeded sample of larger labels).
DENSITY_SAMPLE = 2_000
_GRID = 200
#: Width (in grid bins) of the Gaussian that smooths the density.
_SMOOTH_BINS = 2.0


def reference(ref: Reference, color: str | None = None, *, density: bool = True, labels: bool = True,
              ax: Axes | None = None, point_size: float | None = None, seed: int = 0) -> Axes:
    """The reference cells in their UMAP.

    Parameters
    ----------
    ref
        A reference built with ``umap=True`` (and its cells).
    color
        Column of ``ref.obs`` (categorical: one colour and contour set per label).
    density
        Draw each label's cells as density contours (as R Symphony's ``plotReference``); else points.
    labels
        Write each label at the median of its cells' coordinates.
    ax
        Axes to draw into; a new figure otherwise.
    point_size
        Marker size of points (default from the number of cells).
    seed
        Seeds the sampling of large labels for the density estimate.
    """
    coords = _umap_of(ref)
    ax = _axes(ax)
    if color is None:
        _points(ax, coords, "#555555", point_size)
        return _finish(ax, "reference UMAP")
    values = _column(ref.obs, color, "the reference obs")
    categories, palette = _palette(values)
    rng = np.random.default_rng(seed)
    for label, rgb in zip(categories, palette):
        member = coords[np.asarray(values == label)]
        if len(member) == 0:
            continue
        _points(ax, member, [rgb], point_size, n_total=len(coords), alpha=0.3 if density else 1.0)
        if density and len(member) >= 10:
            _contours(ax, coords, member, rng, colors=[rgb], filled=True)
    if labels:
        _label_centres(ax, coords, values, categories)
    _legend(ax, categories, palette)
    return _finish(ax, f"reference UMAP: {color}")


def mapping(ref: Reference, query: ad.AnnData, color: str | None = None, *, ax: Axes | None = None,
            point_size: float | None = None, labels: bool = False, seed: int = 0) -> Axes:
    """Mapped query cells (``query.obsm['X_umap']``) coloured by ``query.obs[color]``, over the grey
    density of the reference cells."""
    coords = _umap_of(ref)
    if "X_umap" not in query.obsm:
        raise ValueError("the query has no obsm['X_umap']: map it with map_query onto a reference built with "
                         "umap=True")
    placed = np.asarray(query.obsm["X_umap"])
    ax = _axes(ax)
    _contours(ax, coords, coords, np.random.default_rng(seed), colors=["#8c8c8c"], filled=True)
    if color is None:
        _points(ax, placed, "#d62728", point_size)
        return _finish(ax, "query in the reference UMAP")
    values = _column(query.obs, color, "the query obs")
    categories, palette = _palette(values)
    for label, rgb in zip(categories, palette):
        member = placed[np.asarray(values == label)]
        if len(member):
            _points(ax, member, [rgb], point_size, n_total=len(placed))
    if labels:
        _label_centres(ax, placed, values, categories)
    _legend(ax, categories, palette)
    return _finish(ax, f"query in the reference UMAP: {color}")


def confusion(true: pd.Series | np.ndarray, predicted: pd.Series | np.ndarray, *, ax: Axes | None = None,
              annotate: bool = True) -> Axes:
    """Row-normalized confusion matrix: the fraction of the cells of each true label (rows) given each
    predicted label (columns)."""
    true = pd.Series(np.asarray(true, dtype=object).astype(str), name="true")
    predicted = pd.Series(np.asarray(predicted, dtype=object).astype(str), name="predicted")
    if len(true) != len(predicted):
        raise ValueError(f"true has {len(true)} labels but predicted has {len(predicted)}")
    table = pd.crosstab(true, predicted)
    columns = sorted(set(table.columns) | set(table.index), key=lambda c: (c not in table.index, c))
    table = table.reindex(columns=columns, fill_value=0)
    fractions = table.div(table.sum(axis=1), axis=0)
    ax = _axes(ax, size=(1.0 + 0.5 * len(columns), 1.0 + 0.45 * len(table)))
    image = ax.imshow(fractions.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if annotate:
        for i, row in enumerate(fractions.to_numpy()):
            for j, value in enumerate(row):
                if value >= 0.005:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value > 0.6 else "black")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true label")
    ax.set_title("confusion (row-normalized)")
    return ax


def mapping_scores(query: ad.AnnData, groupby: str, *, key: str = "mapping_score", threshold: float | None = None,
                   log: bool = True, ax: Axes | None = None) -> Axes:
    """Box plots of the per-cell mapping metric ``query.obs[key]`` (see
    :func:`~symphony_dask.per_cell_mapping_metric`) per group of ``query.obs[groupby]`` (e.g. the
    predicted cell type), lowest median first, on a log axis unless ``log=False``; ``threshold``
    draws a line (high values: states the reference does not hold)."""
    scores = _column(query.obs, key, "the query obs")
    if not pd.api.types.is_numeric_dtype(scores):
        raise ValueError(f"query obs column {key!r} is not numeric")
    groups = _column(query.obs, groupby, "the query obs").astype(str)
    frame = pd.DataFrame({"score": scores.to_numpy(dtype=float), "group": groups.to_numpy()})
    order = frame.groupby("group")["score"].median().sort_values().index.tolist()
    ax = _axes(ax, size=(1.5 + 0.5 * len(order), 4.0))
    ax.boxplot([frame.loc[frame.group == g, "score"].to_numpy() for g in order], showfliers=True,
               flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(order) + 1), order, rotation=90)
    if log and (frame.score > 0).all():
        ax.set_yscale("log")
    ax.set_ylabel(key)
    ax.set_xlabel(groupby)
    if threshold is not None:
        ax.axhline(threshold, color="#d62728", lw=1, ls="--")
    ax.set_title(f"{key} by {groupby}")
    return ax


# -- helpers -----------------------------------------------------------------------------------------


def _umap_of(ref: Reference) -> np.ndarray:
    if ref.umap is None:
        raise ValueError("this reference has no UMAP: build it with umap=True (the default)")
    return np.asarray(ref.umap)


def _column(frame: pd.DataFrame, key: str, where: str) -> pd.Series:
    if key not in frame.columns:
        cols = ", ".join(map(repr, frame.columns)) or "(none)"
        raise ValueError(f"{key!r} is not a column of {where}; the columns are: {cols}")
    return frame[key]


def _axes(ax: Axes | None, size: tuple[float, float] = (6.0, 5.0)) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)[1]


def _palette(values: pd.Series) -> tuple[list, list]:
    import matplotlib as mpl

    # colours follow the full category list, so that predicted labels (categories of the reference
    # labels) keep the reference's colours even when some are absent; absent ones are then dropped
    categories = list(values.cat.categories) if isinstance(values.dtype, pd.CategoricalDtype) else sorted(
        values.astype(str).unique())
    cmap = mpl.colormaps["tab10" if len(categories) <= 10 else "tab20"]
    palette = [cmap(i % cmap.N) for i in range(len(categories))]
    present = [(c, p) for c, p in zip(categories, palette) if (values == c).any()]
    return [c for c, _ in present], [p for _, p in present]


def _points(ax: Axes, xy: np.ndarray, color, size: float | None, n_total: int | None = None,
            alpha: float = 1.0) -> None:
    n = n_total or len(xy)
    size = size if size is not None else float(np.clip(6_000 / max(n, 1), 0.5, 12))
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c=color, linewidths=0, alpha=alpha, rasterized=n > 5_000)


def _contours(ax: Axes, frame: np.ndarray, xy: np.ndarray, rng: np.random.Generator, *, colors: list,
              filled: bool) -> None:
    """Density contours of ``xy`` on a grid spanning ``frame``: a 2-D histogram smoothed by a Gaussian
    of :data:`_SMOOTH_BINS` bins (so small and far-apart groups keep their own peaks), with levels
    that enclose about 90%, 60% and 30% of the cells."""
    from scipy.ndimage import gaussian_filter

    if len(xy) > DENSITY_SAMPLE:
        xy = xy[rng.choice(len(xy), DENSITY_SAMPLE, replace=False)]
    lo, hi = frame.min(axis=0), frame.max(axis=0)
    pad = 0.05 * (hi - lo) + 1e-9
    edges = [np.linspace(lo[i] - pad[i], hi[i] + pad[i], _GRID + 1) for i in range(2)]
    counts, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=edges)
    z = gaussian_filter(counts, _SMOOTH_BINS).T
    at_cells = z[np.clip(np.searchsorted(edges[1], xy[:, 1]) - 1, 0, _GRID - 1),
                 np.clip(np.searchsorted(edges[0], xy[:, 0]) - 1, 0, _GRID - 1)]
    levels = np.unique(np.quantile(at_cells, [0.1, 0.4, 0.7]))
    levels = levels[levels > 0]
    if len(levels) == 0:
        return
    centres = [(e[1:] + e[:-1]) / 2 for e in edges]
    if filled:  # nested translucent bands: darker where more cells are
        for level in levels:
            ax.contourf(*centres, z, levels=[level, max(z.max(), level * 1.001)], colors=colors, alpha=0.3)
    else:
        ax.contour(*centres, z, levels=levels, colors=colors, linewidths=0.9)


def _label_centres(ax: Axes, coords: np.ndarray, values: pd.Series, categories: list) -> None:
    for label in categories:
        member = coords[np.asarray(values == label)]
        if len(member):
            x, y = np.median(member, axis=0)
            ax.text(x, y, str(label), fontsize=8, weight="bold", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})


def _legend(ax: Axes, categories: list, palette: list) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=c, label=str(label)) for label, c in zip(categories, palette)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=8)


def _finish(ax: Axes, title: str) -> Axes:
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax
