"""Plots of a reference and its mapped queries (matplotlib; scanpy-like ``color=``, ``ax=``, returning the Axes).

- :func:`reference`: the reference UMAP as density bands per label, labels at their centers
  (R Symphony's ``plotReference(as.density=TRUE)``), or as points;
- :func:`mapping`: query cells over the gray density of the reference;
- :func:`confusion`: row-normalized confusion matrix of true against predicted labels;
- :func:`mapping_scores`: the per-cell mapping metric per (predicted) cell type.

A figure made here (no ``ax=``) has matplotlib's constrained layout and a size that leaves room for its
legend and labels, so that they lie inside it, also when it is saved without ``bbox_inches``. Given
``ax=``, the layout is its figure's: ``layout="constrained"`` or ``fig.tight_layout()`` keeps the legend,
which stands to the right of the axes, inside the figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from collections.abc import Iterable

    import anndata as ad
    from matplotlib.axes import Axes

    from symphony_dask._reference.model import Reference

#: Reference cells per label drawn into a density estimate (a seeded sample of larger labels).
DENSITY_SAMPLE = 2_000
_GRID = 200
#: Width (in grid bins) of the Gaussian that smooths the density.
_SMOOTH_BINS = 2.0
#: The density bands of a label: their lower levels, as fractions of the label's own density maximum (so
#: that a label of a few cells gets its bands as a large one does), and their opacities.
_BAND_LEVELS = (0.05, 0.25, 0.6)
_BAND_ALPHAS = (0.2, 0.35, 0.55)
#: The gray density of the reference under mapped query cells: its levels and opacities.
_BACKGROUND_LEVELS = (0.01, 0.08, 0.35)
_BACKGROUND_ALPHAS = (0.15, 0.25, 0.35)
#: Size (inches) of a UMAP figure without its legend, whose width comes on top.
_UMAP_SIZE = (6.0, 5.0)
#: Legend entries per column.
_LEGEND_ROWS = 18
#: The color of cells that label transfer called 'Unknown' (``transfer_labels(unknown=...)``): a gray
#: darker than the reference under them and than the gray of the tab10/tab20 palettes.
UNKNOWN_COLOR = (0.3, 0.3, 0.3, 1.0)


def reference(
    ref: Reference,
    color: str | None = None,
    *,
    density: bool = True,
    labels: bool = True,
    ax: Axes | None = None,
    point_size: float | None = None,
    seed: int = 0,
) -> Axes:
    """The reference cells in their UMAP.

    Parameters
    ----------
    ref
        A reference built with ``umap=True`` (and its cells).
    color
        Column of ``ref.obs`` (categorical: one color and set of density bands per label).
    density
        Draw each label's cells as density bands (as R Symphony's ``plotReference``) over faint points;
        else points. The bands lie at fractions of each label's own density maximum, so that a label of a
        few cells (down to one) gets bands as a large one does; larger labels are drawn first, so that
        smaller ones stay on top. The bands of a label are one contour set, of gid ``"density <label>"``.
    labels
        Write each label at the median of its cells' coordinates (moved into the axes where it would
        stick out, and down or up where it would cover another label).
    ax
        Axes to draw into; a new figure otherwise.
    point_size
        Marker size of points (default from the number of cells).
    seed
        Seeds the sampling of large labels for the density estimate.

    Returns
    -------
    Axes
        The axes drawn into.
    """
    coords = _umap_of(ref)
    if color is None:
        ax = _axes(ax, _UMAP_SIZE)
        _points(ax, coords, "#555555", point_size)
        return _finish(ax, "reference UMAP")
    values = _column(ref.obs, color, "the reference obs")
    categories, palette = _palette(values)
    ax = _axes(ax, (_UMAP_SIZE[0] + _legend_width(categories), _UMAP_SIZE[1]))
    edges = _grid(coords)
    rng = np.random.default_rng(seed)
    members = {label: coords[np.asarray(values == label)] for label in categories}
    for label, rgb in sorted(zip(categories, palette, strict=True), key=lambda item: -len(members[item[0]])):
        _points(ax, members[label], [rgb], point_size, n_total=len(coords), alpha=0.3 if density else 1.0)
        if density:
            _bands(ax, edges, members[label], rng, rgb, _BAND_LEVELS, _BAND_ALPHAS, gid=f"density {label}")
    if labels:
        _label_centers(ax, members)
    _legend(ax, categories, palette)
    return _finish(ax, f"reference UMAP: {color}")


def mapping(
    ref: Reference,
    query: ad.AnnData,
    color: str | None = None,
    *,
    ax: Axes | None = None,
    point_size: float | None = None,
    labels: bool = False,
    seed: int = 0,
) -> Axes:
    """Mapped query cells (``query.obsm['X_umap']``) over the reference cells.

    The reference cells are drawn as light gray points under gray density bands.

    Parameters
    ----------
    ref
        The reference the query was mapped onto, built with ``umap=True``.
    query
        A query mapped by :func:`~symphony_dask.map_query` (with ``obsm['X_umap']``).
    color
        Column of ``query.obs`` (categorical, e.g. ``"cell_type_pred"``); the query cells are red otherwise.
    ax
        Axes to draw into; a new figure otherwise.
    point_size
        Marker size of the query cells (default from their number).
    labels
        Write each label at the median of its query cells' coordinates.
    seed
        Seeds the sampling of the reference cells for their density.

    Returns
    -------
    Axes
        The axes drawn into: the query's points over the reference's gray bands.
    """
    if "X_umap" not in query.obsm:
        raise ValueError("the query has no obsm['X_umap']: map it with map_query onto a reference built with umap=True")
    coords = _umap_of(ref)
    placed = np.asarray(query.obsm["X_umap"])
    values = None if color is None else _column(query.obs, color, "the query obs")
    categories, palette = ([], []) if values is None else _palette(values)
    ax = _axes(ax, (_UMAP_SIZE[0] + _legend_width(categories), _UMAP_SIZE[1]))
    _points(ax, coords, "#d9d9d9", None)
    _bands(
        ax,
        _grid(coords),
        coords,
        np.random.default_rng(seed),
        (0.35, 0.35, 0.35),
        _BACKGROUND_LEVELS,
        _BACKGROUND_ALPHAS,
        gid="density reference",
    )
    if values is None:
        _points(ax, placed, "#d62728", point_size)
        return _finish(ax, "query in the reference UMAP")
    members = {label: placed[np.asarray(values == label)] for label in categories}
    for label, rgb in sorted(zip(categories, palette, strict=True), key=lambda item: -len(members[item[0]])):
        _points(ax, members[label], [rgb], point_size, n_total=len(placed))
    if labels:
        _label_centers(ax, members)
    _legend(ax, categories, palette)
    return _finish(ax, f"query in the reference UMAP: {color}")


def confusion(
    true: pd.Series | np.ndarray, predicted: pd.Series | np.ndarray, *, ax: Axes | None = None, annotate: bool = True
) -> Axes:
    """Row-normalized confusion matrix of true (rows) against predicted labels (columns).

    Each entry is the fraction of the cells of its true label given its predicted label.

    Parameters
    ----------
    true
        The true label of each cell.
    predicted
        The predicted label of each cell (as many as ``true``).
    ax
        Axes to draw into; a new figure otherwise, sized to the number and length of the labels.
    annotate
        Write each fraction of at least 0.005 into its cell.

    Returns
    -------
    Axes
        The axes drawn into.
    """
    true = pd.Series(np.asarray(true, dtype=object).astype(str), name="true")
    predicted = pd.Series(np.asarray(predicted, dtype=object).astype(str), name="predicted")
    if len(true) != len(predicted):
        raise ValueError(f"true has {len(true)} labels but predicted has {len(predicted)}")
    table = pd.crosstab(true, predicted)
    columns = sorted(set(table.columns) | set(table.index), key=lambda c: (c not in table.index, c))
    table = table.reindex(columns=columns, fill_value=0)
    fractions = table.div(table.sum(axis=1), axis=0)
    ax = _axes(
        ax, (2.4 + 0.45 * len(columns) + _text_width(table.index), 1.0 + 0.4 * len(table) + _text_width(columns))
    )
    image = ax.imshow(fractions.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90)
    ax.set_yticks(range(len(table)), table.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if annotate:
        for i, row in enumerate(fractions.to_numpy()):
            for j, value in enumerate(row):
                if value >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.6 else "black",
                    )
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true label")
    ax.set_title("confusion (row-normalized)")
    return ax


def mapping_scores(
    query: ad.AnnData,
    groupby: str,
    *,
    key: str = "mapping_score",
    threshold: float | None = None,
    log: bool = True,
    ax: Axes | None = None,
) -> Axes:
    """Box plots of the per-cell mapping metric per group of query cells, lowest median first.

    Parameters
    ----------
    query
        A mapped query with the metric in ``query.obs[key]`` (see
        :func:`~symphony_dask.per_cell_mapping_metric`).
    groupby
        Column of ``query.obs`` that groups the cells (e.g. the predicted cell type).
    key
        Column of ``query.obs`` with the metric.
    threshold
        Draw a line at this value (high values: states the reference does not hold).
    log
        Use a log axis (where all values are positive).
    ax
        Axes to draw into; a new figure otherwise, sized to the number and length of the groups.

    Returns
    -------
    Axes
        The axes drawn into.
    """
    scores = _column(query.obs, key, "the query obs")
    if not pd.api.types.is_numeric_dtype(scores):
        raise ValueError(f"query obs column {key!r} is not numeric")
    groups = _column(query.obs, groupby, "the query obs").astype(str)
    frame = pd.DataFrame({"score": scores.to_numpy(dtype=float), "group": groups.to_numpy()})
    order = frame.groupby("group")["score"].median().sort_values().index.tolist()
    ax = _axes(ax, (2.0 + 0.5 * len(order), 3.5 + _text_width(order)))
    ax.boxplot(
        [frame.loc[frame.group == g, "score"].to_numpy() for g in order], showfliers=True, flierprops={"markersize": 2}
    )
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


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    """``ax``, or the axes of a new figure of ``size`` inches with a constrained layout.

    The constrained layout keeps the legend, tick labels and titles inside the figure.
    """
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, layout="constrained")[1]


def _text_width(texts: Iterable) -> float:
    """About the width (inches) of the longest of ``texts`` at matplotlib's default font size."""
    return 0.09 * max((len(str(t)) for t in texts), default=0)


def _legend_width(categories: list) -> float:
    """About the width (inches) of the legend of ``categories`` (font size 8) beside the axes."""
    if not categories:
        return 0.0
    columns = 1 + (len(categories) - 1) // _LEGEND_ROWS
    return 0.2 + columns * (0.35 + 0.8 * _text_width(categories))


def _palette(values: pd.Series) -> tuple[list, list]:
    import matplotlib as mpl

    # colors follow the full category list, so that predicted labels (categories of the reference
    # labels) keep the reference's colors even when some are absent; absent ones are then dropped
    categories = (
        list(values.cat.categories)
        if isinstance(values.dtype, pd.CategoricalDtype)
        else sorted(values.astype(str).unique())
    )
    cmap = mpl.colormaps["tab10" if len(categories) <= 10 else "tab20"]
    palette = [UNKNOWN_COLOR if c == "Unknown" else cmap(i % cmap.N) for i, c in enumerate(categories)]
    present = [(c, p) for c, p in zip(categories, palette, strict=True) if (values == c).any()]
    return [c for c, _ in present], [p for _, p in present]


def _points(
    ax: Axes, xy: np.ndarray, color, size: float | None, n_total: int | None = None, alpha: float = 1.0
) -> None:
    n = n_total or len(xy)
    size = size if size is not None else float(np.clip(6_000 / max(n, 1), 0.5, 12))
    ax.scatter(xy[:, 0], xy[:, 1], s=size, c=color, linewidths=0, alpha=alpha, rasterized=n > 5_000)


def _grid(coords: np.ndarray) -> list[np.ndarray]:
    """Edges of the :data:`_GRID` x :data:`_GRID` bins of the densities: they span ``coords`` and 5% more."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    pad = 0.05 * (hi - lo) + 1e-9
    return [np.linspace(lo[i] - pad[i], hi[i] + pad[i], _GRID + 1) for i in range(2)]


def _bands(
    ax: Axes,
    edges: list[np.ndarray],
    xy: np.ndarray,
    rng: np.random.Generator,
    rgb: tuple,
    levels: tuple[float, ...],
    alphas: tuple[float, ...],
    *,
    gid: str,
) -> None:
    """Filled density bands of ``xy``, drawn as one contour set of gid ``gid``.

    The density is a 2-D histogram on the grid of ``edges`` smoothed by a Gaussian of :data:`_SMOOTH_BINS`
    bins (so that small and far-apart groups keep their own peaks) and scaled to its maximum, banded at
    ``levels`` (fractions of the maximum), each band of color ``rgb`` at its opacity in ``alphas`` (more
    opaque where more cells are).
    """
    from scipy.ndimage import gaussian_filter

    if len(xy) > DENSITY_SAMPLE:
        xy = xy[rng.choice(len(xy), DENSITY_SAMPLE, replace=False)]
    counts, _, _ = np.histogram2d(xy[:, 0], xy[:, 1], bins=edges)
    z = gaussian_filter(counts, _SMOOTH_BINS).T
    centers = [(e[1:] + e[:-1]) / 2 for e in edges]
    bands = ax.contourf(*centers, z / z.max(), levels=[*levels, 1.0], colors=[(*rgb[:3], a) for a in alphas])
    bands.set_gid(gid)


def _label_centers(ax: Axes, members: dict[str, np.ndarray]) -> None:
    """Write each label at the median of its cells (``members``: label -> coordinates).

    Labels of more cells come first. They are placed as the axes stand now (a layout engine may still
    resize them a little): a label that would stick out of the axes moves in, and one that would cover a
    label written before moves down or up by its height until it covers none.
    """
    from matplotlib.patheffects import withStroke

    ax.autoscale_view()
    inside = ax.get_window_extent()
    written = []
    for label in sorted(members, key=lambda c: -len(members[c])):
        text = ax.annotate(
            str(label),
            tuple(np.median(members[label], axis=0)),
            xytext=(0, 0),
            textcoords="offset points",
            fontsize=8,
            weight="bold",
            ha="center",
            va="center",
            path_effects=[withStroke(linewidth=2.5, foreground="white", alpha=0.8)],
        )
        box = text.get_window_extent().padded(2)
        dx = max(inside.x0 - box.x0, 0) - max(box.x1 - inside.x1, 0)
        shifts = (box.height * sign * k for k in range(2 * len(written) + 1) for sign in (-1, 1))
        dy = next(d for d in shifts if not any(box.translated(dx, d).overlaps(w) for w in written))
        text.xyann = (dx * 72 / ax.figure.dpi, dy * 72 / ax.figure.dpi)
        written.append(box.translated(dx, dy))


def _legend(ax: Axes, categories: list, palette: list) -> None:
    """The legend of the colors of ``categories``, to the right of the axes."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", ls="", color=c, label=str(label))
        for label, c in zip(categories, palette, strict=True)
    ]
    ax.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        frameon=False,
        fontsize=8,
        ncols=1 + (len(categories) - 1) // _LEGEND_ROWS,
    )


def _finish(ax: Axes, title: str) -> Axes:
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return ax
