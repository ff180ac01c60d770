"""Command line: symphony-dask build, symphony-dask map and symphony-dask demo.

Heavy modules (dask, anndata, the engine) are imported when a command runs, so that --help
answers at once.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import anndata as ad

DESCRIPTION = """\
Build a Symphony reference from single-cell expression (Harmony-integrated PCA, compressed), map
query cells onto it and transfer annotations from their nearest reference cells. Inputs are
AnnData .h5ad files or .zarr stores, read in chunks of cells; --cluster or --scheduler runs the
work on a Dask cluster (see cluster_configs/README.md)."""

EPILOG = """\
examples:
  symphony-dask build ref.h5ad --out ref.zarr --batch-key donor --layer counts
  symphony-dask build atlas.zarr --out ref.zarr --batch-key donor --obs-filter "donor != 'd7'" \\
      --cluster cluster_configs/slurm.yaml
  symphony-dask map --reference ref.zarr --query query.h5ad --layer counts --batch-key donor \\
      --transfer cell_type --out mapped.h5ad"""

#: Output suffixes of a mapped query (one query file).
MAPPED_SUFFIXES = (".h5ad", ".zarr")
#: Picture formats of --plot.
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


class UsageError(ValueError):
    """A command line that cannot be run as given (found before any work starts)."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``symphony-dask`` command; returns the exit status (0 done, 2 refused
    input, 1 failed run).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    _log_to_stderr(verbose=args.verbose, quiet=args.quiet)
    from symphony_dask._dask.chunked import WorkerFailure
    from symphony_dask.cli.spelling import command_line_spelling

    try:
        with ExitStack() as stack:
            stack.enter_context(command_line_spelling())
            stack.enter_context(warnings.catch_warnings())
            warnings.showwarning = _show_warning
            args.check(args)
            _run_with_scheduler(args, stack)
            return args.run(args)
    except (UsageError, ValueError, KeyError, TypeError, FileExistsError, FileNotFoundError) as err:
        print(f"symphony-dask: error: {err}", file=sys.stderr)
        return 2
    except (WorkerFailure, OSError) as err:  # OSError: an output the file system refuses (full, read-only)
        print(f"symphony-dask: error: {err}", file=sys.stderr)
        return 1


class _StderrHandler(logging.StreamHandler):
    """Log lines as they are, to the ``sys.stderr`` of the moment (notebooks and tests replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr(*, verbose: bool, quiet: bool) -> None:
    """symphony_dask's lines (one per finished stage or Harmony iteration) unless ``quiet``; with
    ``verbose``, every logger's (dask's messages about workers joining, ...).
    """
    package, root = logging.getLogger("symphony_dask"), logging.getLogger()
    for logger in (package, root):
        for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
            logger.removeHandler(handler)
    (root if verbose else package).addHandler(_StderrHandler())
    package.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    if verbose:
        root.setLevel(logging.DEBUG)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"symphony-dask: warning: {message}", file=sys.stderr)


def _run_with_scheduler(args: argparse.Namespace, stack: ExitStack) -> None:
    """Connect to the cluster asked for (and close one started here at the end), or draw progress
    bars on the threaded scheduler.
    """
    from symphony_dask._dask.cluster import connect, wait_for_workers
    from symphony_dask._dask.dashboard import served_dashboard_link

    client = connect(cluster_file=args.cluster, scheduler=args.scheduler)
    if client is not None:
        if args.cluster is not None:  # started here: its workers (SLURM jobs, pods) end with the command
            stack.callback(client.cluster.close)
        stack.enter_context(client)
        link = served_dashboard_link(client)
        if link is not None:
            print(f"Dask dashboard: {link}", flush=True)
        wait_for_workers(client)
    elif not args.quiet:
        from symphony_dask._dask.progress import PassProgress

        stack.enter_context(PassProgress(minimum=1.0))


# -- build -------------------------------------------------------------------------------------------


def _check_build(args: argparse.Namespace) -> None:
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


def _build(args: argparse.Namespace) -> int:
    from symphony_dask._reference.build import build_reference

    reference = build_reference(
        args.input,
        args.batch_key or None,
        normalize="tfidf" if args.tfidf else not args.no_normalize,
        n_hvg=args.n_hvg,
        variable_genes=args.variable_genes,
        additional_genes=args.additional_genes,
        hvg_batch_key=args.hvg_batch_key,
        n_pcs=args.n_pcs,
        n_clusters=args.n_clusters,
        theta=args.theta,
        max_iter_harmony=args.max_iter_harmony,
        harmony_flavor=args.harmony_flavor,
        seed=args.seed,
        chunk_size=args.chunk_size,
        layer=args.layer,
        obs_filter=args.obs_filter,
        keep_embedding=not args.minimal,
        neighbor_index=not args.no_neighbor_index,
        umap=not args.no_umap,
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


# -- map ---------------------------------------------------------------------------------------------


def _check_map(args: argparse.Namespace) -> None:
    from symphony_dask._io.atomic import check_replaceable, refuse_overlap
    from symphony_dask._mapping.query import query_shards

    _check_positive(args, "k", "chunk_size")
    if args.min_confidence is not None and not 0 <= args.min_confidence <= 1:
        raise UsageError(f"--min-confidence {args.min_confidence}: a fraction of the k votes, between 0 and 1")
    if args.plot is not None and Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
        raise UsageError(f"--plot {args.plot}: name a picture file ending in {', '.join(PLOT_SUFFIXES)}")
    if not args.transfer and args.min_confidence is not None:
        raise UsageError("--min-confidence applies to --transfer; name the labels to transfer")
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
        args.targets = [out / f"{_stem(shard)}.symphony{args.format}" for shard in args.shards]
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

        check_transfers(reference, labels=args.transfer, values=args.transfer_values, k=args.k)


def _map(args: argparse.Namespace) -> int:
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
    for key in args.transfer:
        transfer_labels(reference, mapped, key, k=args.k, min_confidence=args.min_confidence)
    if args.transfer_values:
        transfer_values(reference, mapped, args.transfer_values, k=args.k)
    print(
        f"mapped {mapped.n_obs} cells from {len(shards)} file(s) "
        f"({mapped.uns['symphony']['fraction_genes_found']:.1%} of reference genes found)"
    )
    for key in args.transfer:
        counts = mapped.obs[f"{key}_pred"].value_counts()
        print(f"{key}_pred: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
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


def _plot_mapping(reference, mapped: ad.AnnData, args: argparse.Namespace) -> None:
    """The query over the reference density, coloured by the first transferred label."""
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


#: Written into the metadata of every picture of --plot, so that --overwrite knows it replaces one of ours.
PICTURE_MARK = "symphony_dask map --plot"


def is_our_picture(path: Path) -> bool:
    """Whether ``path`` is a picture that ``map --plot`` drew (a file carrying :data:`PICTURE_MARK`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file() or path.suffix.lower() not in PLOT_SUFFIXES:
        return False
    if path.stat().st_size > 64 * 2**20:
        return False
    return PICTURE_MARK.encode() in path.read_bytes()


def is_mapped_anndata(path: Path) -> bool:
    """Whether ``path`` is an AnnData (``.h5ad`` file or zarr store) that carries ``uns['symphony']``,
    i.e. a mapped query that ``--overwrite`` may replace.
    """
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        node = path / "uns" / "symphony"
        return node.is_dir() and ((node / "zarr.json").is_file() or (node / ".zgroup").is_file())
    if not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return isinstance(handle.get("uns/symphony"), h5py.Group)
    except OSError:
        return False


def write_anndata(adata: ad.AnnData, path: Path, suffix: str) -> None:
    """Write ``adata`` as ``.h5ad`` or as a zarr v3 store (one chunk file per array, no sharding).

    An ``.h5ad`` is assembled in memory and written to ``path`` in one plain write: HDF5 writing
    straight to a disk that fills up crashes the process (h5py 3, segmentation fault), where a plain
    write fails with an error that names the full disk.
    """
    import anndata as ad
    import h5py

    if suffix != ".zarr":
        adata.strings_to_categoricals()  # as write_h5ad does
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as handle:
            ad.io.write_elem(handle, "/", adata)
        with open(path, "wb") as out:
            out.write(buffer.getbuffer())
            out.flush()
            os.fsync(out.fileno())
        return
    with ad.settings.override(zarr_write_format=3, auto_shard_zarr_v3=False), warnings.catch_warnings():
        # anndata consolidates the metadata, as every AnnData zarr store has (read_zarr expects it)
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        adata.write_zarr(path)


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in MAPPED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# -- shared ------------------------------------------------------------------------------------------


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def _demo(args: argparse.Namespace) -> int:
    from symphony_dask.cli.demo import format_report, run_demo

    print(format_report(run_demo(chunk_size=args.chunk_size)))
    return 0


def _nothing_to_check(args: argparse.Namespace) -> None:
    _check_positive(args, "chunk_size")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (unless it is off, empty, or said in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default" in text
            or not action.option_strings
            or action.default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    from symphony_dask import __version__

    parser = argparse.ArgumentParser(
        prog="symphony-dask", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    run = common.add_argument_group("where and how it runs")
    run.add_argument(
        "--cluster",
        metavar="FILE",
        help="start the Dask cluster FILE describes (cluster_configs/*.yaml) and stop it at the end; "
        "default: threads of this process",
    )
    run.add_argument(
        "--scheduler", metavar="ADDRESS", help="use the running Dask scheduler at ADDRESS (e.g. tcp://10.0.0.5:8786)"
    )
    run.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="CELLS",
        help="cells per chunk of the expression matrix; default: one chunk for small in-memory data, "
        "else as many cells (at most 10,000) as the memory of a task holds",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log everything, dask's messages included")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def subcommand(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, parents=[common], help=help, description=description, formatter_class=_HelpFormatter
        )

    b = subcommand(
        "build",
        "build a reference from an .h5ad or .zarr AnnData",
        "Build a Symphony reference: variable genes, scaling, PCA, Harmony over --batch-key, compression.",
    )
    b.add_argument("input", help="reference expression: an .h5ad file or AnnData .zarr store, cells x genes")
    b.add_argument("--out", required=True, metavar="REF.zarr", help="reference store to write (a .zarr folder)")
    _add_input_options(b, "reference")
    b.add_argument(
        "--obs-filter",
        metavar="EXPR",
        help="build from the cells where EXPR over obs columns holds (pandas query syntax), "
        "e.g. \"donor != 'd7' and n_genes > 500\"",
    )
    b.add_argument(
        "--batch-key",
        action="append",
        default=[],
        metavar="COLUMN",
        help="obs column to integrate over with Harmony; repeat for several; none: soft k-means without correction",
    )
    b.add_argument("--n-hvg", type=int, default=2000, metavar="GENES", help="variable genes per --hvg-batch-key group")
    b.add_argument(
        "--hvg-batch-key",
        default=None,
        metavar="COLUMN",
        help="obs column whose groups each contribute their top --n-hvg genes; default: all cells as one group",
    )
    b.add_argument(
        "--variable-genes",
        choices=["vst", "mvp"],
        default="vst",
        help="variable-gene method: vst (as R Symphony) or mvp (mean.var.plot)",
    )
    b.add_argument(
        "--additional-genes",
        nargs="+",
        default=None,
        metavar="GENE",
        help="genes always kept beside the variable ones (e.g. markers); default: none",
    )
    b.add_argument(
        "--tfidf",
        action="store_true",
        help="the input is a (binarized) peak x cell matrix: TF-IDF-normalize it as Signac's RunTFIDF "
        "instead of log(CP10K+1); queries are normalized with the reference's IDF",
    )
    b.add_argument("--n-pcs", type=int, default=20, metavar="N", help="principal components of the embedding")
    b.add_argument(
        "--n-clusters",
        type=int,
        default=None,
        metavar="K",
        help="Harmony's soft clusters; default: min(100, cells / 30)",
    )
    b.add_argument(
        "--theta", type=float, default=2.0, help="Harmony's diversity penalty (0: no push to mix the batches)"
    )
    b.add_argument(
        "--harmony-flavor",
        choices=["harmony1", "harmony2"],
        default="harmony1",
        help="harmony1: harmony 0.1, as the Symphony paper; harmony2: R harmony 2.0 / harmonypy 2.1, "
        "with their settings",
    )
    b.add_argument(
        "--max-iter-harmony",
        type=int,
        default=None,
        metavar="N",
        help="most Harmony iterations (default: 20 for harmony1, as R Symphony; 10 for harmony2)",
    )
    b.add_argument(
        "--seed", type=int, default=111, metavar="N", help="seed of the k-means start and Harmony's block order"
    )
    b.add_argument(
        "--minimal",
        action="store_true",
        help="save only the compressed reference, without the per-cell embedding and obs "
        "(mapping works; label transfer does not)",
    )
    b.add_argument(
        "--no-neighbor-index",
        action="store_true",
        help="do not build the HNSW index for label transfer now (built at the first transfer instead)",
    )
    b.add_argument(
        "--no-umap",
        action="store_true",
        help="no UMAP of the reference (mapped queries then get no obsm['X_umap'] and map --plot is refused)",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing reference store")
    b.set_defaults(run=_build, check=_check_build)

    m = subcommand(
        "map",
        "map a query onto a reference",
        "Map query cells into a reference's corrected embedding; transfer labels or values.",
    )
    m.add_argument("--reference", required=True, metavar="REF.zarr", help="reference store written by 'build'")
    m.add_argument(
        "--query",
        required=True,
        metavar="PATH",
        help="query expression (.h5ad or .zarr), or a quoted glob of shards ('shards/*.h5ad') mapped together",
    )
    m.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="one query file: the mapped AnnData, .h5ad or .zarr (zarr v3); several: a folder that gets "
        "one <shard>.symphony.h5ad (or --format) each",
    )
    m.add_argument("--format", choices=MAPPED_SUFFIXES, default=".h5ad", help="format of per-shard outputs")
    _add_input_options(m, "query")
    m.add_argument(
        "--batch-key",
        action="append",
        default=[],
        metavar="COLUMN",
        help="query obs column whose batch effects are removed; repeat for several; none: all query "
        "cells are one batch",
    )
    m.add_argument("--per-batch", action="store_true", help="fit each query batch's terms on its own")
    m.add_argument(
        "--gene-key",
        default=None,
        metavar="COLUMN",
        help="query var column holding the reference's gene names; default: the query's var_names",
    )
    m.add_argument(
        "--transfer",
        action="append",
        default=[],
        metavar="COLUMN",
        help="reference obs label to transfer by a k-NN vote (writes <COLUMN>_pred and _conf); repeat for several",
    )
    m.add_argument(
        "--transfer-values",
        action="append",
        default=[],
        metavar="KEY",
        help="numeric reference obs column or obsm key to transfer as a k-NN mean; repeat for several",
    )
    m.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="FRACTION",
        help="label cells whose winning label has fewer votes than this fraction 'Unassigned' "
        "(the paper uses 0.6); default: keep every vote",
    )
    m.add_argument(
        "--k", type=int, default=5, metavar="K", help="reference neighbours of each query cell for transfers"
    )
    m.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the query over the reference UMAP (coloured by the first --transfer label) into FILE "
        "(.png, .pdf or .svg); default: no picture",
    )
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.set_defaults(run=_map, check=_check_map)

    d = subcommand(
        "demo",
        "build, map and annotate the bundled PBMC data",
        "Symphony's PBMC example on the bundled data: build from 3'v2 + 5', map 3'v1, transfer cell types.",
    )
    d.set_defaults(run=_demo, check=_nothing_to_check)
    return parser


def _add_input_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--layer",
        default=None,
        metavar="NAME",
        help=f"read the {what}'s layers[NAME] instead of X (e.g. --layer counts for scanpy's "
        "layout: log values in X, counts in a layer); default: X",
    )
    parser.add_argument(
        "--no-normalize",
        action="store_true",
        help=f"the {what} values are log(CP10K+1) already; without it they must be raw counts, normalized on the fly",
    )


if __name__ == "__main__":
    sys.exit(main())
