"""The command line's parser: commands, their options and their help."""

from __future__ import annotations

import argparse

from symphony_dask._harmony.settings import FLAVOR_DEFAULTS, HarmonySettings
from symphony_dask.cli.commands import check_build, check_map, check_nothing, run_build, run_demo_report, run_map
from symphony_dask.cli.outputs import MAPPED_SUFFIXES

#: Each command's one-line help and its description.
COMMANDS = {
    "build": (
        "build a reference from an .h5ad or .zarr AnnData",
        "Build a Symphony reference: variable genes, scaling, PCA, Harmony over --batch-key, compression.",
    ),
    "map": (
        "map a query onto a reference",
        "Map query cells into a reference's corrected embedding; transfer labels or values.",
    ),
    "demo": (
        "build, map and annotate the bundled PBMC data",
        "Symphony's PBMC example on the bundled data: build from 3'v2 + 5', map 3'v1, transfer cell types.",
    ),
}
#: Harmony's defaults, the same as build_reference's.
HARMONY = HarmonySettings()

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


def build_parser() -> argparse.ArgumentParser:
    """The ``symphony-dask`` parser with its commands (build, map, demo) and their options."""
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

    def subcommand(name: str) -> argparse.ArgumentParser:
        help, description = COMMANDS[name]
        return sub.add_parser(
            name, parents=[common], help=help, description=description, formatter_class=_HelpFormatter
        )

    b = subcommand("build")
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
        "--theta", type=float, default=HARMONY.theta, help="Harmony's diversity penalty (0: no push to mix the batches)"
    )
    b.add_argument(
        "--harmony-flavor",
        choices=list(FLAVOR_DEFAULTS),
        default=HARMONY.flavor,
        help="harmony1: harmony 0.1, as the Symphony paper; harmony2: R harmony 2.0 / harmonypy 2.1, "
        "with their settings",
    )
    b.add_argument(
        "--max-iter-harmony",
        type=int,
        default=None,
        metavar="N",
        help=f"most Harmony iterations (default: {FLAVOR_DEFAULTS['harmony1']['max_iter_harmony']} for harmony1, as "
        f"R Symphony; {FLAVOR_DEFAULTS['harmony2']['max_iter_harmony']} for harmony2)",
    )
    b.add_argument(
        "--seed",
        type=int,
        default=HARMONY.seed,
        metavar="N",
        help="seed of the k-means start and Harmony's block order",
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
    b.set_defaults(run=run_build, check=check_build)

    m = subcommand("map")
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
        "--label-weights",
        choices=["uniform", "distance"],
        default="uniform",
        help="how the k neighbors vote for --transfer labels: uniform (each counts the same) or distance (a "
        "Gaussian kernel on their distances); the probability of every label is written to obsm[<COLUMN>_proba]",
    )
    m.add_argument(
        "--unknown",
        type=_unknown_threshold,
        default=None,
        metavar="auto|FLOAT",
        help="label cells far from every reference cell 'Unknown' (writes <COLUMN>_novelty, their mean distance "
        "to the 20 nearest reference cells): 'auto' takes the threshold from the reference's own cells (its "
        "95th percentile), a number is the threshold; default: no Unknown",
    )
    m.add_argument(
        "--majority-vote",
        default=None,
        metavar="COLUMN",
        help="query obs column of clusters (e.g. leiden): each cluster gets its most frequent --transfer label "
        "(per-cell labels kept in <COLUMN>_pred_cell); clusters whose label has under half of their cells are "
        "reported; default: a label per cell",
    )
    m.add_argument("--k", type=int, default=5, metavar="K", help="reference neighbors of each query cell for transfers")
    m.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the query over the reference UMAP (colored by the first --transfer label) into FILE "
        "(.png, .pdf or .svg); default: no picture",
    )
    m.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    m.set_defaults(run=run_map, check=check_map)

    d = subcommand("demo")
    d.set_defaults(run=run_demo_report, check=check_nothing)
    return parser


def _unknown_threshold(text: str) -> str | float:
    """``--unknown``'s value: 'auto' or a number."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'auto' or a number (a novelty threshold), got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"'auto' or a finite number, got {text!r}")
    return value


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
