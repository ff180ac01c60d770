"""The commands: build, map and demo, each a check (before any work) and a run.

Heavy modules (dask, anndata, the engine) are imported when a command runs, so that ``--help``
answers at once.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from symphony_dask.cli.outputs import (
    MAPPED_SUFFIXES,
    PICTURE_MARK,
    PLOT_SUFFIXES,
    is_mapped_anndata,
    is_our_picture,
    stem,
    write_anndata,
)

if TYPE_CHECKING:
    import anndata as ad


class UsageError(ValueError):
    """A command line that cannot be run as given (found before any work starts)."""


# -- build ------------------------------------------------------------------------------------------


def check_build(args: argparse.Namespace) -> None:
    """Refuse a build command line that cannot run, before any work (output path, sizes, flags)."""
    from symphony_dask._io.atomic import check_replaceable, refuse_overlap
    from symphony_dask._reference.store import is_reference_store

    out = Path(args.out)
    if out.suffix != ".zarr":
        raise UsageError(f"--out {args.out}: a reference is a zarr store; name it with .zarr (e.g. --out ref.zarr)")
    refuse_overlap(out, [args.input], flag="--out")
    check_replaceable(out, overwrite=args.overwrite, ours=is_reference_store, what="reference store")
    _check_positive(args, "n_hvg", "n_pcs", "n_clusters", "max_iter_harmony", "chunk_size")
    if args.tfidf and args.no_normalize:
        raise UsageError("--tfidf and --no-normalize contradict each other: --tfidf normalizes raw peak counts")


#: Options of ``build`` that build_reference takes under their own names.
BUILD_OPTIONS = (
    "n_hvg", "variable_genes", "additional_genes", "hvg_batch_key", "n_pcs", "n_clusters", "theta",
    "max_iter_harmony", "harmony_flavor", "seed", "chunk_size", "layer", "obs_filter",
)  # fmt: skip


def run_build(args: argparse.Namespace) -> int:
    """Build the reference, save it and print it with its stage times; the exit status."""
    from symphony_dask._reference.build import build_reference

    reference = build_reference(
        args.input,
        args.batch_key or None,
        normalize="tfidf" if args.tfidf else not args.no_normalize,
        keep_embedding=not args.minimal,
        neighbor_index=not args.no_neighbor_index,
        umap=not args.no_umap,
        **{name: getattr(args, name) for name in BUILD_OPTIONS},
    )
    reference.save(args.out, overwrite=args.overwrite)
    print(f"{reference} saved to {args.out}")
    print(format_stage_times(reference.params["timings_s"]))
    return 0


def format_stage_times(timings: dict[str, float]) -> str:
    """One line of stage times in seconds; Harmony's parts in parentheses after its total."""
    parts = {name.removeprefix("harmony "): s for name, s in timings.items() if name.startswith("harmony ")}
    shown = []
    for name, seconds in timings.items():
        if name.startswith("harmony "):
            continue
        text = f"{name} {seconds:.2f}"
        if name == "harmony" and parts:
            text += " (" + ", ".join(f"{part} {s:.2f}" for part, s in parts.items()) + ")"
        shown.append(text)
    return "stage times (s): " + ", ".join(shown)


# -- map --------------------------------------------------------------------------------------------


def check_map(args: argparse.Namespace) -> None:
    """Refuse a map command line that cannot run, before any work (outputs, inputs, options)."""
    from symphony_dask._io.atomic import check_replaceable, refuse_overlap
    from symphony_dask._mapping.query import query_shards

    _check_positive(args, "k", "chunk_size")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise UsageError(f"--min-confidence {args.min_confidence}: a fraction of the k votes, between 0 and 1")
    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {args.plot}: name a picture file ending in {', '.join(PLOT_SUFFIXES)}")
    if not args.transfer and args.min_confidence is not None:
        raise UsageError("--min-confidence applies to --transfer; name the labels to transfer")
    for flag, value in (("--unknown", args.unknown), ("--majority-vote", args.majority_vote)):
        if not args.transfer and value is not None:
            raise UsageError(f"{flag} applies to --transfer; name the labels to transfer")
    if not args.transfer and args.label_weights != "uniform":
        raise UsageError("--label-weights applies to --transfer; name the labels to transfer")
    args.shards = query_shards(args.query)
    out = Path(args.out)
    if len(args.shards) == 1 and out.suffix in MAPPED_SUFFIXES:
        args.targets = [out]
    elif out.suffix:
        if len(args.shards) == 1:
            raise UsageError(
                f"--out {args.out}: a mapped query is written as AnnData; end the name with .h5ad or "
                ".zarr (or give a folder without a suffix)"
            )
        raise UsageError(
            f"--out {args.out}: {len(args.shards)} query files are mapped, each to its own file in the "
            "folder --out names; give a folder name without a suffix (e.g. --out mapped)"
        )
    else:
        args.targets = [out / f"{stem(shard)}.symphony{args.format}" for shard in args.shards]
    inputs = [args.reference, *args.shards]
    outputs = [(target, "--out") for target in args.targets] + ([(out, "--out")] if len(args.shards) > 1 else [])
    if args.plot is not None:
        outputs.append((Path(args.plot), "--plot"))
    for path, flag in outputs:
        refuse_overlap(path, inputs, flag=flag)
    named = [path.resolve() for path, _ in outputs if path != out or len(args.shards) == 1]
    if len(set(named)) < len(named):
        twice = sorted({str(p) for p in named if named.count(p) > 1})
        raise UsageError(
            f"{', '.join(twice)} would be written twice (query files of the same name in different "
            "folders, or --plot naming an output); rename the query files or map them separately"
        )
    for target in args.targets:
        check_replaceable(target, overwrite=args.overwrite, ours=is_mapped_anndata, what="mapped AnnData")
    if args.plot is not None:
        check_replaceable(Path(args.plot), overwrite=args.overwrite, ours=is_our_picture, what="picture")


def _check_reference(args: argparse.Namespace, reference) -> None:
    """What the plot and the transfers need from the reference, checked before the mapping runs."""
    if args.plot is not None and reference.umap_placement() is None:
        raise UsageError(f"--plot: {args.reference} has no UMAP to draw into (built with umap=False or --minimal)")
    if args.transfer or args.transfer_values:
        from symphony_dask._mapping.annotate import check_transfers

        check_transfers(
            reference, labels=args.transfer, values=args.transfer_values, k=args.k, unknown=args.unknown is not None
        )


def run_map(args: argparse.Namespace) -> int:
    """Map the query files, transfer what was asked, draw and write the outputs; the exit status."""
    from symphony_dask._io.atomic import write_atomically
    from symphony_dask._mapping.annotate import transfer_labels, transfer_values
    from symphony_dask._mapping.query import map_query
    from symphony_dask._reference.store import load_reference

    reference = load_reference(args.reference)
    _check_reference(args, reference)
    shards = args.shards
    mapped = map_query(
        reference,
        shards if len(shards) > 1 else shards[0],
        args.batch_key or None,
        normalize=not args.no_normalize,
        gene_key=args.gene_key,
        per_batch=args.per_batch,
        chunk_size=args.chunk_size,
        layer=args.layer,
    )
    if args.transfer:
        transfer_labels(
            reference,
            mapped,
            list(dict.fromkeys(args.transfer)),  # each once, from one neighbor search
            k=args.k,
            min_confidence=args.min_confidence,
            weights=args.label_weights,
            unknown=args.unknown,
            majority_vote=args.majority_vote,
        )
        for key in dict.fromkeys(args.transfer):
            _storable_probabilities(mapped, key)
    if args.transfer_values:
        transfer_values(reference, mapped, args.transfer_values, k=args.k)
    print(
        f"mapped {mapped.n_obs} cells from {len(shards)} file(s) "
        f"({mapped.uns['symphony']['fraction_genes_found']:.1%} of reference genes found)"
    )
    for key in dict.fromkeys(args.transfer):
        counts = mapped.obs[f"{key}_pred"].value_counts()
        line = f"{key}_pred: " + ", ".join(f"{label} {n}" for label, n in counts.items())
        if args.unknown is not None:
            record = mapped.uns["symphony"][f"{key}_unknown"]
            how = "calibrated on the reference" if record["method"] == "auto" else "given"
            line += (
                f" (Unknown: {int(counts.get('Unknown', 0))} of {mapped.n_obs} cells, "
                f"novelty above {record['threshold']:.4g}, {how})"
            )
        print(line)
    if args.plot is not None:
        _plot_mapping(reference, mapped, args)
    for i, target in enumerate(args.targets):
        part = mapped if len(shards) == 1 else mapped[mapped.obs["symphony_shard"].to_numpy() == i].copy()
        write_atomically(
            target,
            lambda tmp, part=part, suffix=target.suffix: write_anndata(part, tmp, suffix),
            overwrite=args.overwrite,
            ours=is_mapped_anndata,
            what="mapped AnnData",
        )
        print(f"written to {target}")
    return 0


def _storable_probabilities(mapped: ad.AnnData, key: str) -> None:
    """Label probabilities whose labels hold a '/' (which AnnData stores refuse in names) as an array.

    The labels, the array's columns, go to ``uns['symphony'][f'{key}_proba_labels']``.
    """
    import warnings

    import numpy as np

    proba = mapped.obsm[f"{key}_proba"]
    if not any("/" in str(label) for label in proba.columns):
        return
    mapped.obsm[f"{key}_proba"] = proba.to_numpy()
    mapped.uns["symphony"][f"{key}_proba_labels"] = np.asarray(proba.columns, dtype=str)
    warnings.warn(
        f"labels of {key} hold '/', which AnnData stores refuse in column names: obsm['{key}_proba'] is written "
        f"as an array, its columns' labels in uns['symphony']['{key}_proba_labels']",
        UserWarning,
        stacklevel=2,
    )


def _plot_mapping(reference, mapped: ad.AnnData, args: argparse.Namespace) -> None:
    """The query over the reference density, colored by the first transferred label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from symphony_dask import pl
    from symphony_dask._io.atomic import write_atomically

    color = f"{args.transfer[0]}_pred" if args.transfer else None
    ax = pl.mapping(reference, mapped, color=color)
    kind = Path(args.plot).suffix.lower()
    metadata = {".png": {"Software": PICTURE_MARK}}.get(kind, {"Creator": PICTURE_MARK})

    def save(tmp: Path) -> None:
        ax.figure.savefig(tmp, format=kind[1:], dpi=150, bbox_inches="tight", metadata=metadata)

    try:
        write_atomically(Path(args.plot), save, overwrite=args.overwrite, ours=is_our_picture, what="picture")
    finally:
        plt.close(ax.figure)
    print(f"plot written to {args.plot}")


# -- shared -----------------------------------------------------------------------------------------


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def run_demo_report(args: argparse.Namespace) -> int:
    """Run the bundled demo and print its report; the exit status."""
    from symphony_dask.cli.demo import format_report, run_demo

    print(format_report(run_demo(chunk_size=args.chunk_size)))
    return 0


def check_nothing(args: argparse.Namespace) -> None:
    """The demo's check: only the chunk size can be wrong."""
    _check_positive(args, "chunk_size")
