"""Figures that fit: each pl figure, drawn at its default size, holds its legend and every text inside it, and
pl.reference gives every labeled group, the smallest included, density bands over its cells."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.contour import ContourSet
from matplotlib.text import Text

import symphony_dask as sd
from symphony_dask import pl

matplotlib.use("Agg")

FIGURES = {
    "reference": lambda ref, query: pl.reference(ref, color="cell_type"),
    "reference_points": lambda ref, query: pl.reference(ref, color="cell_type", density=False),
    "reference_plain": lambda ref, query: pl.reference(ref),
    "mapping": lambda ref, query: pl.mapping(ref, query, color="cell_type_pred"),
    "mapping_labeled": lambda ref, query: pl.mapping(ref, query, color="cell_type_pred", labels=True),
    "mapping_plain": lambda ref, query: pl.mapping(ref, query),
    "confusion": lambda ref, query: pl.confusion(query.obs["cell_type"], query.obs["cell_type_pred"]),
    "mapping_scores": lambda ref, query: pl.mapping_scores(query, "cell_type_pred", threshold=10),
}


@pytest.fixture(scope="module")
def labeled(built_reference, pbmcs, oracle):
    query = sd.map_query(built_reference, pbmcs[oracle.query_cells].copy(), "donor", normalize=False)
    sd.transfer_labels(built_reference, query, "cell_type")
    query.obs["mapping_score"] = sd.per_cell_mapping_metric(built_reference, query)
    return query


@pytest.fixture()
def drawn(request, built_reference, labeled):
    """The axes of a figure of FIGURES, drawn (Agg) at its default size; closed afterwards."""
    ax = FIGURES[request.param](built_reference, labeled)
    ax.figure.canvas.draw()
    yield ax
    plt.close(ax.figure)


def _drawn_texts(fig) -> list[Text]:
    """Every non-empty visible text the figure draws: titles, axis labels, the tick labels of the ticks in
    view (of the color bar too), texts written into the axes, legend texts."""
    texts = list(fig.texts)
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            texts += [
                label
                for tick in axis.get_major_ticks() + axis.get_minor_ticks()
                if lo <= tick.get_loc() <= hi
                for label in (tick.label1, tick.label2)
            ]
        if ax.get_legend() is not None:
            texts += [*ax.get_legend().get_texts(), ax.get_legend().get_title()]
    return [t for t in texts if t.get_visible() and t.get_text()]


def _inside(box, frame, tolerance: float = 1.0) -> bool:
    return (
        box.x0 >= frame.x0 - tolerance
        and box.y0 >= frame.y0 - tolerance
        and box.x1 <= frame.x1 + tolerance
        and box.y1 <= frame.y1 + tolerance
    )


@pytest.mark.parametrize("drawn", list(FIGURES), indirect=True)
def test_legend_and_every_text_lie_inside_the_figure(drawn):
    fig = drawn.figure
    renderer = fig.canvas.get_renderer()
    texts = _drawn_texts(fig)
    assert drawn.get_title() in [t.get_text() for t in texts]
    outside = [
        (t.get_text(), t.get_window_extent(renderer).bounds)
        for t in texts
        if not _inside(t.get_window_extent(renderer), fig.bbox)
    ]
    assert not outside, f"outside the figure {fig.bbox.bounds}: {outside}"
    if drawn.get_legend() is not None:
        assert _inside(drawn.get_legend().get_window_extent(renderer), fig.bbox)
        assert not drawn.get_legend().get_window_extent(renderer).overlaps(drawn.get_window_extent(renderer))


@pytest.mark.parametrize("drawn", ["reference", "reference_points", "mapping_labeled"], indirect=True)
def test_group_labels_do_not_cover_each_other(drawn):
    boxes = [t.get_window_extent(drawn.figure.canvas.get_renderer()) for t in drawn.texts]
    assert len(boxes) >= 8
    assert not [(i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])]


@pytest.mark.parametrize("drawn", ["reference"], indirect=True)
def test_every_group_has_density_bands_over_its_cells(drawn, built_reference):
    """Bands at fractions of each group's own density maximum: the single HSC cell, the 4 MK cells and
    the 42 NK cells get theirs as T_CD4's 276 do; the smallest groups' bands are drawn last (on top)."""
    labels = built_reference.obs["cell_type"].astype(str).to_numpy()
    sizes = dict(zip(*np.unique(labels, return_counts=True), strict=True))
    bands = {c.get_gid(): c for c in drawn.collections if isinstance(c, ContourSet)}
    assert set(bands) == {f"density {label}" for label in sizes}
    smallest = min(sizes, key=sizes.get)
    assert sizes[smallest] == 1  # HSC
    for label, n in sizes.items():
        paths = [p for p in bands[f"density {label}"].get_paths() if len(p.vertices)]
        assert paths, f"{label} ({n} cells) has no density band"
        cells = built_reference.umap[labels == label]
        covered = np.any([p.contains_points(cells) for p in paths], axis=0)
        assert covered.mean() >= 0.8, f"{label}: {covered.mean():.2f} of its cells under its bands"
    order = [c.get_gid() for c in drawn.collections if isinstance(c, ContourSet)]
    assert [sizes[gid.removeprefix("density ")] for gid in order] == sorted(sizes.values(), reverse=True)
