"""Command line: ``symphony-dask build``, ``symphony-dask map`` and ``symphony-dask demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import anndata as ad

from . import __version__
from .annotate import transfer_labels, transfer_values
from .build import build_reference
from .cluster import connect
from .demo import format_report, run_demo
from .mapping import map_query, query_shards
from .progress import PassProgress
from .reference import load_reference
from .store import write_atomically


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``symphony-dask`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    if not args.quiet:  # one line per finished pass or Harmony iteration
        logging.getLogger("symphony_dask").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with ExitStack() as stack:
            client = connect(cluster_file=args.cluster, scheduler=args.scheduler)
            if client is not None:
                if args.cluster is not None:  # started here: its workers (SLURM jobs, pods) end with the command
                    stack.callback(client.cluster.close)
                stack.enter_context(client)
                print(f"Dask dashboard: {client.dashboard_link}")
            elif not args.quiet:
                stack.enter_context(PassProgress(minimum=1.0))
            return args.run(args)
    except (ValueError, KeyError, FileExistsError, FileNotFoundError) as err:
        print(f"symphony-dask: error: {err}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    _refuse_existing(Path(args.out), args.overwrite)
    reference = build_reference(
        args.input, args.batch_key or None, normalize=not args.no_normalize, n_hvg=args.n_hvg,
        hvg_batch_key=args.hvg_batch_key, n_pcs=args.n_pcs, n_clusters=args.n_clusters, theta=args.theta,
        max_iter_harmony=args.max_iter_harmony, seed=args.seed, chunk_size=args.chunk_size, keep_embedding=not args.minimal,
        neighbor_index=not args.no_neighbor_index,
    )
    reference.save(args.out, overwrite=args.overwrite)
    print(f"{reference} saved to {args.out}")
    print("stage times (s): " + ", ".join(f"{k} {v:.2f}" for k, v in reference.params["timings_s"].items()))
    return 0


def _map(args: argparse.Namespace) -> int:
    shards = query_shards(args.query)
    out = Path(args.out)
    one_file = len(shards) == 1 and out.suffix in (".h5ad", ".zarr")
    targets = [out] if one_file else [out / f"{_stem(shard)}.symphony{args.format}" for shard in shards]
    for target in targets:
        _refuse_existing(target, args.overwrite)
    reference = load_reference(args.reference)
    mapped = map_query(
        reference, shards if len(shards) > 1 else shards[0], args.batch_key or None,
        normalize=not args.no_normalize, gene_key=args.gene_key, per_batch=args.per_batch, chunk_size=args.chunk_size,
    )
    for key in args.transfer:
        transfer_labels(reference, mapped, key, k=args.k, min_confidence=args.min_confidence)
    if args.transfer_values:
        transfer_values(reference, mapped, args.transfer_values, k=args.k)
    print(f"mapped {mapped.n_obs} cells from {len(shards)} file(s) "
          f"({mapped.uns['symphony']['fraction_genes_found']:.1%} of reference genes found)")
    for key in args.transfer:
        counts = mapped.obs[f"{key}_pred"].value_counts()
        print(f"{key}_pred: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    for i, target in enumerate(targets):
        part = mapped if len(shards) == 1 else mapped[mapped.obs["symphony_shard"].to_numpy() == i].copy()
        write_atomically(target, lambda tmp, part=part, suffix=target.suffix: _write_anndata(part, tmp, suffix),
                         overwrite=args.overwrite)
        print(f"written to {target}")
    return 0


def _stem(path: str) -> str:
    name = Path(path).name
    for suffix in (".h5ad", ".zarr"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """Fail before any work rather than after it."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")


def _write_anndata(adata: ad.AnnData, path: Path, suffix: str) -> None:
    if suffix == ".zarr":
        adata.write_zarr(path)
    else:
        adata.write_h5ad(path)


def _demo(args: argparse.Namespace) -> int:
    print(format_report(run_demo(chunk_size=args.chunk_size)))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symphony-dask", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cluster", metavar="FILE", help="start the Dask cluster described in FILE (cluster_configs/)")
    common.add_argument("--scheduler", metavar="ADDRESS", help="use the running Dask scheduler at ADDRESS")
    common.add_argument("--chunk-size", type=int, default=None, help="cells per chunk")
    common.add_argument("-v", "--verbose", action="store_true", help="log everything, dask's messages included")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or stage lines")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", parents=[common], help="build a reference from an .h5ad or .zarr AnnData")
    b.add_argument("input", help="reference expression (.h5ad or .zarr), cells x genes")
    b.add_argument("--out", required=True, help="reference store to write (.zarr)")
    b.add_argument("--batch-key", action="append", default=[], help="obs column to integrate over (repeatable)")
    b.add_argument("--no-normalize", action="store_true", help="the input is already log(CP10K+1)-normalized")
    b.add_argument("--n-hvg", type=int, default=2000, help="variable genes per --hvg-batch-key group")
    b.add_argument("--hvg-batch-key", default=None, help="obs column: select variable genes per group")
    b.add_argument("--n-pcs", type=int, default=20)
    b.add_argument("--n-clusters", type=int, default=None)
    b.add_argument("--theta", type=float, default=2.0)
    b.add_argument("--max-iter-harmony", type=int, default=20, help="maximum Harmony iterations")
    b.add_argument("--seed", type=int, default=111)
    b.add_argument("--minimal", action="store_true", help="save only the minimal elements (no per-cell embedding)")
    b.add_argument("--no-neighbor-index", action="store_true",
                   help="do not build the HNSW index for label transfer now (built at the first transfer instead)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing reference store")
    b.set_defaults(run=_build)

    m = sub.add_parser("map", parents=[common], help="map a query onto a reference")
    m.add_argument("--reference", required=True, help="reference store written by 'build'")
    m.add_argument("--query", required=True,
                   help="query expression (.h5ad or .zarr), or a quoted glob of shards ('shards/*.h5ad') mapped together")
    m.add_argument("--out", required=True,
                   help="output AnnData (.h5ad/.zarr) for one query file, else a folder: one <shard>.symphony.h5ad each")
    m.add_argument("--format", choices=[".h5ad", ".zarr"], default=".h5ad", help="format of per-shard outputs")
    m.add_argument("--batch-key", action="append", default=[], help="query obs column to correct (repeatable)")
    m.add_argument("--per-batch", action="store_true", help="fit each query batch's terms on its own")
    m.add_argument("--gene-key", default=None, help="query var column holding the reference's gene names")
    m.add_argument("--no-normalize", action="store_true", help="the query is already log(CP10K+1)-normalized")
    m.add_argument("--transfer", action="append", default=[], metavar="KEY", help="reference obs label to transfer")
    m.add_argument("--transfer-values", action="append", default=[], metavar="KEY",
                   help="numeric reference obs column or obsm key to transfer as a k-NN mean")
    m.add_argument("--min-confidence", type=float, default=None, help="label cells below it 'Unassigned'")
    m.add_argument("--k", type=int, default=5, help="neighbours for transfers")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.set_defaults(run=_map)

    d = sub.add_parser("demo", parents=[common], help="build, map and annotate the bundled PBMC data")
    d.set_defaults(run=_demo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
