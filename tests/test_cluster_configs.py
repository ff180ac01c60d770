"""The cluster configurations in cluster_configs/ are valid and produce the clusters they describe."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from symphony_dask.cluster import make_cluster, read_cluster_config

CONFIGS = Path(__file__).parents[1] / "cluster_configs"


def test_local_config_starts_a_local_cluster():
    cluster, jobs = make_cluster(CONFIGS / "local.yaml")
    with cluster:
        assert len(cluster.workers) == 2 and jobs is None


def test_slurm_config_writes_a_job_script():
    cluster, jobs = make_cluster(CONFIGS / "slurm.yaml")
    with cluster:
        script = cluster.job_script()
    assert jobs == 4
    assert "--interface" not in script  # interface: null leaves dask's default
    for line in ("#SBATCH -p normal", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH -t 04:00:00",
                 "source ~/venvs/symphony/bin/activate", "--nworkers 2"):
        assert line in script, line


def test_kubernetes_config_names_a_daskcluster_resource():
    config = read_cluster_config(CONFIGS / "kubernetes.yaml")
    spec = yaml.safe_load((CONFIGS / config["spec"]).read_text())
    assert spec["apiVersion"] == "kubernetes.dask.org/v1" and spec["kind"] == "DaskCluster"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 4
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    image = worker["spec"]["containers"][0]["image"]
    assert image == scheduler["image"] and "symphony-dask" in image  # built by cluster_configs/Dockerfile
    assert "EXTRA_PIP_PACKAGES" not in str(spec)  # symphony_dask is not on PyPI
    dockerfile = (CONFIGS / "Dockerfile").read_text()
    assert "pip install --no-cache-dir /src" in dockerfile and "COPY symphony_dask /src/symphony_dask" in dockerfile
    assert spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == spec["metadata"]["name"]
    if importlib.util.find_spec("dask_kubernetes") is None:
        with pytest.raises(ValueError, match=r'pip install "\.\[kubernetes\]" from the symphony_dask repository root'):
            make_cluster(CONFIGS / "kubernetes.yaml")


def test_bad_cluster_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("cluster:\n  kind: pbs\n")
    with pytest.raises(ValueError, match="unknown cluster kind 'pbs'; known kinds: local, slurm, kubernetes"):
        read_cluster_config(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("workers: 2\n")
    with pytest.raises(ValueError, match="must hold a 'cluster' mapping with a 'kind'"):
        read_cluster_config(tmp_path / "empty.yaml")


def test_slurm_config_names_the_interface(tmp_path):
    """A site whose nodes talk over InfiniBand sets `interface`: the workers are started with it."""
    text = (CONFIGS / "slurm.yaml").read_text().replace("interface: null", "interface: lo")
    (tmp_path / "slurm.yaml").write_text(text)
    cluster, _ = make_cluster(tmp_path / "slurm.yaml")
    with cluster:
        assert "--interface lo" in cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1")


def test_docs_install_extras_from_the_repository():
    """symphony_dask is not on PyPI: every install line names the extras of the checkout."""
    for path in [*CONFIGS.iterdir(), CONFIGS.parent / "README.md"]:
        if path.is_file():
            assert "symphony_dask[" not in path.read_text(), path
