"""The cluster configurations in cluster_configs/ are valid and produce the clusters they describe."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from _helpers import CLUSTER_CONFIGS

from symphony_dask._dask.cluster import make_cluster, read_cluster_config


@pytest.mark.cluster
def test_local_config_starts_a_local_cluster():
    cluster, jobs = make_cluster(CLUSTER_CONFIGS / "local.yaml")
    with cluster:
        assert len(cluster.workers) == 2 and jobs is None


@pytest.mark.cluster
def test_slurm_config_writes_a_job_script():
    cluster, jobs = make_cluster(CLUSTER_CONFIGS / "slurm.yaml")
    with cluster:
        script = cluster.job_script()
    assert jobs == 4
    assert "--interface" not in script  # interface: null leaves dask's default
    for line in (
        "#SBATCH -p normal",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=30G",
        "#SBATCH -t 04:00:00",
        "source ~/venvs/symphony/bin/activate",
        "--nworkers 2",
    ):
        assert line in script, line


def test_kubernetes_config_names_a_daskcluster_resource():
    config = read_cluster_config(CLUSTER_CONFIGS / "kubernetes.yaml")
    spec = yaml.safe_load((CLUSTER_CONFIGS / config["spec"]).read_text())
    assert spec["apiVersion"] == "kubernetes.dask.org/v1" and spec["kind"] == "DaskCluster"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 4
    scheduler = spec["spec"]["scheduler"]["spec"]["containers"][0]
    image = worker["spec"]["containers"][0]["image"]
    assert image == scheduler["image"] and "symphony-dask" in image  # built by cluster_configs/Dockerfile
    assert "EXTRA_PIP_PACKAGES" not in str(spec)  # symphony_dask is not on PyPI
    dockerfile = (CLUSTER_CONFIGS / "Dockerfile").read_text()
    assert "cd /src && python -m pip install ." in dockerfile and "COPY symphony_dask /src/symphony_dask" in dockerfile
    assert spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == spec["metadata"]["name"]
    if importlib.util.find_spec("dask_kubernetes") is None:
        with pytest.raises(ValueError, match=r'pip install "\.\[kubernetes\]" from the symphony_dask repository root'):
            make_cluster(CLUSTER_CONFIGS / "kubernetes.yaml")


def test_bad_cluster_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("cluster:\n  kind: pbs\n")
    with pytest.raises(ValueError, match="unknown cluster kind 'pbs'; known kinds: local, slurm, kubernetes"):
        read_cluster_config(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("workers: 2\n")
    with pytest.raises(ValueError, match="must hold a 'cluster' mapping with a 'kind'"):
        read_cluster_config(tmp_path / "empty.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("- cluster\n- kind: local\n", r"must hold a 'cluster' mapping with a 'kind' .*, found a list"),
        ("", r"must hold a 'cluster' mapping .*found nothing"),
        ("cluster:\n  - kind: local\n", r"found a 'cluster' list \(write its keys one per line, without '- '\)"),
        ("cluster:\n  kind: local\n   n_workers: 2\n", r" is not valid YAML: mapping values are not allowed"),
        ("cluster:\n  kind: local\nworkers: 2\n", r"unknown top-level key\(s\) 'workers'; a cluster file holds one"),
        (
            "cluster:\n  kind: local\n  n_worker: 2\n",
            (
                r"unknown key 'n_worker' for a local cluster; did you mean "
                r"'n_workers'\? the valid keys \(those of distributed.LocalCluster and its workers\) are: "
                r"kind, .*, n_workers"
            ),
        ),
        (
            "cluster:\n  kind: slurm\n  partition: debug\n",
            (
                r"unknown key 'partition' for a slurm cluster; did you mean "
                r"'queue'\? the valid keys \(those of dask_jobqueue.SLURMCluster\) are: kind, jobs, account"
            ),
        ),
        (
            "cluster:\n  kind: kubernetes\n  name: x\n  replicas: 2\n",
            r"unknown key 'replicas' for a kubernetes cluster; the valid keys are: kind, spec, name, namespace$",
        ),
        ("cluster:\n  kind: local\n  n_workers: two\n", r"n_workers must be a whole number, got 'two' \(str\)"),
        ("cluster:\n  kind: slurm\n  walltime: 4:00:00\n", r"walltime must be text, got 14400 \(int\) \(quote it"),
        ("cluster:\n  kind: slurm\n  jobs: 0\n", r"jobs must be at least 1, got 0"),
        ("cluster:\n  kind: slurm\n  job_script_prologue: source env\n", r"job_script_prologue must be a list"),
        ("cluster:\n  kind: kubernetes\n", r"needs either 'spec' .* or 'name' .*, not both or neither"),
        ("cluster:\n  kind: kubernetes\n  spec: missing.yaml\n", r"spec 'missing.yaml' names no file"),
    ],
    ids=[
        "top-level list",
        "empty",
        "cluster list",
        "bad yaml",
        "top-level key",
        "local key",
        "slurm key",
        "kubernetes key",
        "n_workers type",
        "unquoted walltime",
        "no jobs",
        "prologue type",
        "no spec or name",
        "missing spec",
    ],
)
def test_malformed_cluster_file_names_file_key_and_valid_keys(tmp_path, text, message):
    if "slurm" in text:
        pytest.importorskip("dask_jobqueue")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "bad.yaml")) + ".*" + message):
        make_cluster(tmp_path / "bad.yaml")


@pytest.mark.cluster
def test_slurm_config_names_the_interface(tmp_path):
    """A site whose nodes talk over InfiniBand sets `interface`: the workers are started with it."""
    text = (CLUSTER_CONFIGS / "slurm.yaml").read_text().replace("interface: null", "interface: lo")
    (tmp_path / "slurm.yaml").write_text(text)
    cluster, _ = make_cluster(tmp_path / "slurm.yaml")
    with cluster:
        assert "--interface lo" in cluster.job_script()
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1")


def test_docs_install_extras_from_the_repository():
    """symphony_dask is not on PyPI: every install line names the extras of the checkout."""
    for path in [*CLUSTER_CONFIGS.iterdir(), CLUSTER_CONFIGS.parent / "README.md"]:
        if path.is_file():
            assert "symphony_dask[" not in path.read_text(), path


# --- Kubernetes, as close to real as a machine without Kubernetes allows (issue #26) -----------------------------
#
# The DaskCluster resource is checked three ways: against the operator's CustomResourceDefinition (what the API server
# checks on `kubectl apply`), through the Kubernetes client's V1PodSpec model (field names and types of the pods the
# operator creates), and for the dask settings Kubernetes cannot know about (ports, images, threads and memory).

#: The ports dask's scheduler and its dashboard listen on unless told otherwise, and the names dask-kubernetes looks
#: the scheduler Service's ports up by (dask_kubernetes/operator/networking.py).
SCHEDULER_PORTS = {"tcp-comm": 8786, "http-dashboard": 8787}


def _yaml(path: Path) -> Any:
    """A YAML file's content (the C loader where PyYAML has it: the operator's CRDs are large)."""
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


@functools.cache
def _operator_crd(name: str) -> dict[str, Any]:
    """The operator's CustomResourceDefinition ``name`` (e.g. ``daskcluster``) as its Helm chart installs it.

    ``dask_kubernetes/operator/customresources/<name>.yaml`` in the wheel is the CRD's source: its openAPIV3Schema
    is a ``$ref`` into ``templates.yaml``, whose pod and service specs are ``$ref`` s into the Kubernetes API schemata
    of k8s-crd-resolver (a build tool of dask-kubernetes, not installed with it). The Helm chart in the same wheel
    holds the CRD with those references resolved and the ``*.patch.yaml`` defaults applied: what ``helm install`` puts
    in a cluster. This returns that one, after checking that it is the CRD of ``customresources/`` (``_same_crd``).
    Read once: do not modify.
    """
    operator = Path(importlib.util.find_spec("dask_kubernetes.operator").origin).parent
    installed = _yaml(operator / "deployment" / "helm" / "dask-kubernetes-operator" / "crds" / f"{name}.yaml")
    source = _yaml(operator / "customresources" / f"{name}.yaml")
    templates = _yaml(operator / "customresources" / "templates.yaml")["definitions"]
    _same_crd(installed, source, templates)
    return installed


def _same_crd(installed: dict[str, Any], source: dict[str, Any], templates: dict[str, Any]) -> None:
    """Assert that the resolved CRD of the Helm chart is the CRD of ``customresources/``: the same names and versions,
    and at the dask level (cluster, scheduler, worker) the same fields and required fields as ``templates.yaml``."""

    def without_schemas(crd: dict[str, Any]) -> dict[str, Any]:
        spec = {
            **crd["spec"],
            "versions": [{k: v for k, v in served.items() if k != "schema"} for served in crd["spec"]["versions"]],
        }
        return {"apiVersion": crd["apiVersion"], "kind": crd["kind"], "metadata": crd["metadata"], "spec": spec}

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref", "")
        return templates[ref.split("/definitions/")[1]] if "customresources/templates.yaml" in ref else schema

    def same_fields(resolved: dict[str, Any], template: dict[str, Any]) -> None:
        template = resolve(template)
        assert sorted(resolved.get("required", [])) == sorted(template.get("required", []))
        assert set(resolved.get("properties", {})) == set(template.get("properties", {}))
        for key, sub in template.get("properties", {}).items():
            if "k8s_crd_resolver" not in sub.get("$ref", ""):  # below: Kubernetes' own pod and service schemata
                same_fields(resolved["properties"][key], sub)

    assert without_schemas(installed) == without_schemas(source)
    for served, source_version in zip(installed["spec"]["versions"], source["spec"]["versions"], strict=True):
        same_fields(served["schema"]["openAPIV3Schema"], source_version["schema"]["openAPIV3Schema"])


def _kubernetes_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a CRD's openAPIV3Schema that jsonschema validates as the API server does on ``kubectl apply``
    (strict field validation, the default since Kubernetes 1.25):

    - an unknown field is an error (``additionalProperties: false`` on every object, except where
      ``x-kubernetes-preserve-unknown-fields`` keeps unknown fields, or ``additionalProperties`` says what they hold);
    - ``x-kubernetes-int-or-string`` takes an integer or a string, ``nullable`` adds null, int32 and int64 are bounded;
    - ``format: int-or-string`` on a ``type: string`` field (how k8s-crd-resolver writes probe and Service ports) stays
      a string: the API server enforces the type, so an integer probe port is rejected there too (dask-kubernetes
      issue 778). Write those ports by name, as the operator's own specs do.

    ``x-kubernetes-list-type`` is checked by the validator of ``_crd_validator``.
    """
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: _kubernetes_schema(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _kubernetes_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_kubernetes_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = bool(out.get("x-kubernetes-preserve-unknown-fields"))
    bits = {"int32": 31, "int64": 63}.get(out.get("format", ""))
    if bits and out.get("type") == "integer":
        out.setdefault("minimum", -(2**bits))
        out.setdefault("maximum", 2**bits - 1)
    if out.get("nullable") and "type" in out:
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """``x-kubernetes-list-type``: the entries of a ``set`` are unique, and those of a ``map`` unique by their
    ``x-kubernetes-list-map-keys`` (with the keys' defaults, e.g. a port's protocol TCP, filled in as the API server
    does before it validates)."""
    import jsonschema

    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    defaults = {key: schema.get("items", {}).get("properties", {}).get(key, {}).get("default") for key in keys}
    seen: set[str] = set()
    for item in instance:
        entry = (
            item if list_type == "set" or not isinstance(item, dict) else {k: item.get(k, defaults[k]) for k in keys}
        )
        key = json.dumps(entry, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}")
        seen.add(key)


def _without_nulls(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` without the nulls of fields that are not ``nullable``: the API server drops those before it
    validates (and the Kubernetes client drops every null)."""
    if isinstance(value, dict):
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties")
        subs = {key: properties.get(key, extra if isinstance(extra, dict) else {}) for key in value}
        return {
            key: _without_nulls(v, subs[key]) for key, v in value.items() if v is not None or subs[key].get("nullable")
        }
    if isinstance(value, list):
        return [_without_nulls(v, schema.get("items", {})) for v in value]
    return value


def _crd_problems(resource: dict[str, Any], crd_name: str) -> list[str]:
    """What the API server would say creating ``resource`` as the custom resource of the operator's CRD ``crd_name``
    defines: the group, version and kind, the name the operator accepts, and the openAPIV3Schema of the version."""
    from dask_kubernetes.exceptions import ValidationError
    from dask_kubernetes.operator.validation import validate_cluster_name

    crd = _operator_crd(crd_name)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    versions = [f"{group}/{v['name']}" for v in crd["spec"]["versions"] if v.get("served")]
    if resource.get("apiVersion") not in versions or resource.get("kind") != kind:
        return [f"not a {kind} of {', '.join(versions)}: {resource.get('apiVersion')} {resource.get('kind')}"]
    problems = []
    try:
        validate_cluster_name(str(resource.get("metadata", {}).get("name")))
    except ValidationError as err:
        problems.append(f"metadata.name: {err.message}")
    validator = _crd_validator(crd_name, resource["apiVersion"])
    errors = validator.iter_errors(_without_nulls(resource, validator.schema))
    return problems + sorted(f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors)


@functools.cache
def _crd_validator(crd_name: str, api_version: str) -> Any:
    """A JSON-schema validator (OpenAPI v3.0 schemas are draft 4, plus ``x-kubernetes-list-type``) of the resource
    of the operator's CRD ``crd_name`` at ``api_version``, made once."""
    import jsonschema

    crd = _operator_crd(crd_name)
    [served] = [v for v in crd["spec"]["versions"] if f"{crd['spec']['group']}/{v['name']}" == api_version]
    schema = _kubernetes_schema(served["schema"]["openAPIV3Schema"])
    schema["properties"] = {
        **schema["properties"],
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object", "required": ["name"]},
    }
    kubernetes_validator = jsonschema.validators.extend(
        jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type}
    )
    kubernetes_validator.check_schema(schema)
    return kubernetes_validator(schema)


def _pod_spec_problems(where: str, pod_spec: Any) -> list[str]:
    """``pod_spec`` read into the Kubernetes client's ``V1PodSpec`` and written back: a field the model refuses, one it
    drops (an unknown key: the client ignores those) and one it changes (a string read as a number) are problems."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    try:
        model = api._ApiClient__deserialize(pod_spec, "V1PodSpec")
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        return [f"{where}: not a V1PodSpec: {' '.join(str(err).split())}"]
    return [
        f"{where}{path}: {what}"
        for path, what in _differences(_without_nulls(pod_spec, {}), api.sanitize_for_serialization(model))
    ]


def _differences(given: Any, back: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """Where ``back`` (the client's serialization) differs from ``given``."""
    if isinstance(given, dict) and isinstance(back, dict):
        for key in given:
            if key not in back:
                yield f"{path}.{key}", "dropped by the Kubernetes client: not a field of the model"
            else:
                yield from _differences(given[key], back[key], f"{path}.{key}")
        for key in set(back) - set(given):
            yield f"{path}.{key}", f"added by the Kubernetes client: {back[key]!r}"
    elif isinstance(given, list) and isinstance(back, list) and len(given) == len(back):
        for i, (a, b) in enumerate(zip(given, back, strict=True)):
            yield from _differences(a, b, f"{path}.{i}")
    elif given != back or type(given) is not type(back):
        yield path, f"{given!r} is read back as {back!r}"


def _option(args: list[str], name: str) -> str | None:
    """The value of the command-line option ``name`` in ``args`` (``--name value`` or ``--name=value``)."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _image_problems(where: str, image: Any) -> list[str]:
    """An image must be named, with a tag (not ``latest``) or a digest, so that every pod runs the same build."""
    if not isinstance(image, str) or not image.strip():
        return [f"{where}: no image"]
    name, _, digest = image.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    if not digest and tag in ("", "latest"):
        return [
            (
                f"{where}: image {image!r} has no tag (or only 'latest'): pods started at different times "
                "could run different builds"
            )
        ]
    return []


def _resource_problems(where: str, resources: dict[str, Any]) -> tuple[list[str], dict[str, dict[str, Decimal]]]:
    """Requests and limits that are not Kubernetes quantities, or limits below requests; and the parsed quantities."""
    from kubernetes.utils import parse_quantity

    problems, parsed = [], {}
    for kind in ("requests", "limits"):
        parsed[kind] = {}
        for name, value in (resources.get(kind) or {}).items():
            try:
                parsed[kind][name] = parse_quantity(value)
            except (ValueError, TypeError) as err:
                problems.append(f"{where}.resources.{kind}.{name}: {value!r} is not a Kubernetes quantity ({err})")
    for name, request in parsed["requests"].items():
        if name in parsed["limits"] and parsed["limits"][name] < request:
            problems.append(
                f"{where}.resources: the {name} limit {resources['limits'][name]} is below the request "
                f"{resources['requests'][name]}"
            )
    return problems, parsed


def _worker_problems(where: str, container: dict[str, Any], quantities: dict[str, dict[str, Decimal]]) -> list[str]:
    """The worker's ``--nthreads`` and ``--memory-limit`` against its container's cpu and memory: each thread has a
    core that is asked for, and dask's memory limit is at most the container's (above it, the kernel kills the pod
    before dask spills or pauses) and not below 80% of it (memory asked for and never used)."""
    from dask.utils import parse_bytes

    args = [str(arg) for arg in container.get("args") or []]
    nthreads, memory_limit = _option(args, "--nthreads"), _option(args, "--memory-limit")
    try:
        nworkers = int(_option(args, "--nworkers") or 1)
        threads = None if nthreads is None else int(nthreads) * nworkers
        relative = memory_limit is None or memory_limit == "auto" or re.fullmatch(r"0?\.\d+|1(\.0*)?", memory_limit)
        total = None if relative else parse_bytes(memory_limit) * nworkers  # "auto" and fractions: of the container
    except ValueError as err:
        return [f"{where}: the worker's arguments {args} do not parse: {err}"]
    problems = []
    cpu = {kind: quantities[kind].get("cpu") for kind in ("requests", "limits")}
    if threads is not None and (
        (cpu["requests"] is not None and threads < cpu["requests"])
        or (cpu["limits"] is not None and threads > cpu["limits"])
    ):
        problems.append(
            f"{where}: --nthreads {nthreads} x {nworkers} worker(s) does not agree with the cpu "
            f"request {cpu['requests']} and limit {cpu['limits']}"
        )
    memory = quantities["limits"].get("memory", quantities["requests"].get("memory"))
    if total is not None and memory is not None and not Decimal("0.8") * memory <= total <= memory:
        problems.append(
            f"{where}: --memory-limit {memory_limit} x {nworkers} worker(s) = {total} bytes, not "
            f"between 80% and 100% of the container's memory ({memory} bytes)"
        )
    dashboard = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}.get("http-dashboard")
    address = _option(args, "--dashboard-address")
    if dashboard is not None and (address is None or address.rsplit(":", 1)[-1] != str(dashboard)):
        problems.append(
            f"{where}: the dashboard port http-dashboard {dashboard} is not the --dashboard-address {address}"
        )
    return problems


def _scheduler_problems(where: str, container: dict[str, Any], service: dict[str, Any]) -> list[str]:
    """The scheduler container declares dask's ports under the names dask-kubernetes looks for, its arguments do not
    move them, its probes and the Service's target ports name ports it has, and the Service has both ports."""
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    problems = [
        f"{where}.ports: no port {name} {number} (dask's default)"
        for name, number in SCHEDULER_PORTS.items()
        if ports.get(name) != number
    ]
    args = [str(arg) for arg in container.get("args") or []]
    for option, name in (("--port", "tcp-comm"), ("--dashboard-address", "http-dashboard")):
        value = _option(args, option)
        if value is not None and value.rsplit(":", 1)[-1] != str(SCHEDULER_PORTS[name]):
            problems.append(f"{where}: {option} {value} is not the port {name} {SCHEDULER_PORTS[name]}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        port = ((container.get(probe) or {}).get("httpGet") or {}).get("port")
        if port is not None and port not in ports and port not in ports.values():
            problems.append(f"{where}.{probe}: port {port!r} is not a port of the container")
    service_ports = {p.get("name"): p for p in service.get("ports") or []}
    for name, number in SCHEDULER_PORTS.items():
        port = service_ports.get(name, {})
        target = port.get("targetPort", port.get("port"))
        if port.get("port") != number or (target not in (name, number)):
            problems.append(f"spec.scheduler.service.ports: no port {name} {number} with targetPort {name}")
    for port in service_ports.values():
        target = port.get("targetPort", port.get("port"))
        if target not in ports and target not in ports.values():
            problems.append(f"spec.scheduler.service.ports: targetPort {target!r} is not a port of the scheduler")
    return problems


def _daskcluster_problems(resource: dict[str, Any]) -> list[str]:
    """Everything wrong with a DaskCluster resource: against the operator's CRD, against the Kubernetes client's pod
    model, and for dask (images, ports, resources and the worker's threads and memory); empty if nothing."""
    problems = _crd_problems(resource, "daskcluster")
    spec = resource.get("spec") or {}
    images = {}
    for role in ("scheduler", "worker"):
        pod = (spec.get(role) or {}).get("spec")
        where = f"spec.{role}.spec"
        problems += _pod_spec_problems(where, pod)
        containers = (pod or {}).get("containers") or [{}]
        for i, container in enumerate((pod or {}).get("initContainers") or []):
            problems += _image_problems(f"{where}.initContainers.{i}", container.get("image"))
        for i, container in enumerate(containers):
            problems += _image_problems(f"{where}.containers.{i}", container.get("image"))
            found, quantities = _resource_problems(f"{where}.containers.{i}", container.get("resources") or {})
            problems += found
            if i == 0 and role == "worker":
                problems += _worker_problems(f"{where}.containers.0", container, quantities)
            if i == 0 and role == "scheduler":
                problems += _scheduler_problems(
                    f"{where}.containers.0", container, spec["scheduler"].get("service") or {}
                )
        images[role] = containers[0].get("image")
    if images["scheduler"] != images["worker"]:
        problems.append(
            f"the scheduler runs {images['scheduler']!r}, the workers {images['worker']!r}: the scheduler, "
            "the workers and the client must agree on the versions of dask and symphony_dask"
        )
    return problems


@pytest.fixture(scope="module")
def kubernetes_tools() -> None:
    """Skip where the test extra's Kubernetes packages are missing."""
    for module in ("dask_kubernetes", "kubernetes", "jsonschema"):
        pytest.importorskip(module)


def test_kubernetes_daskcluster_passes_the_operator_crd_and_the_pod_model(kubernetes_tools):
    """kubernetes-daskcluster.yaml is what the operator's CRD accepts, its pod specs are V1PodSpecs, and its dask
    settings agree with its pods (ports, image, threads and memory)."""
    resource = _yaml(CLUSTER_CONFIGS / "kubernetes-daskcluster.yaml")
    assert _daskcluster_problems(resource) == []
    assert resource["spec"]["scheduler"]["spec"]["containers"][0]["image"].endswith(":" + version("symphony_dask"))


def test_kubernetes_config_creates_the_daskcluster_it_names(kubernetes_tools, monkeypatch, tmp_path):
    """make_cluster("kubernetes.yaml") creates, in the namespace of the config, the DaskCluster of
    kubernetes-daskcluster.yaml unchanged, and that resource passes the checks. No cluster is contacted: the resource
    is caught where KubeCluster would send it to the API server."""
    from dask_kubernetes.operator.kubecluster import kubecluster

    sent = []

    class Sent(Exception):
        """Raised where the resource would be sent, to stop KubeCluster there."""

    class FakeDaskCluster:
        """Stands for kr8s' DaskCluster object: no cluster by that name exists, and creating one records it."""

        def __init__(self, resource: Any, namespace: str | None = None) -> None:
            self.resource, self.namespace = resource, namespace

        def __await__(self) -> Any:
            async def ready() -> FakeDaskCluster:
                return self

            return ready().__await__()

        async def exists(self) -> bool:
            return False

        async def create(self) -> None:
            sent.append((copy.deepcopy(self.resource), self.namespace))
            raise Sent

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))  # anything that slips past fails, offline
    monkeypatch.setattr(kubecluster, "DaskCluster", FakeDaskCluster)
    before = set(kubecluster.KubeCluster._instances)
    try:
        with pytest.raises(Sent):
            make_cluster(CLUSTER_CONFIGS / "kubernetes.yaml")
    finally:
        for cluster in set(kubecluster.KubeCluster._instances) - before:  # the half-started KubeCluster
            cluster.shutdown_on_close = False  # nothing to delete, and no API server to ask at exit
            cluster.close()
            cluster._loop_runner.stop()
    [(resource, namespace)] = sent
    assert namespace == read_cluster_config(CLUSTER_CONFIGS / "kubernetes.yaml")["namespace"]
    assert resource == _yaml(CLUSTER_CONFIGS / "kubernetes-daskcluster.yaml")
    assert _daskcluster_problems(resource) == []


def test_operator_generated_daskcluster_passes_the_checks(kubernetes_tools):
    """The checks accept what dask-kubernetes itself generates (make_cluster_spec, nulls included): they are no
    stricter than the operator."""
    from dask_kubernetes.operator import make_cluster_spec

    quantities = {"cpu": "2", "memory": "8Gi"}
    resource = make_cluster_spec(
        name="symphony-check",
        image="registry.example.org/symphony-dask:0.1.0",
        n_workers=2,
        resources={"requests": quantities, "limits": quantities},
    )
    assert _daskcluster_problems(resource) == []


SCHEDULER = "spec.scheduler.spec.containers.0"
WORKER = "spec.worker.spec.containers.0"
DELETE = object()

#: Broken copies of kubernetes-daskcluster.yaml: (test id, edits of (dotted path, new value or DELETE), what a
#: problem must say).
BROKEN = [
    (
        "misspelled-field",
        [(f"{WORKER}.imagee", "registry.example.org/symphony-dask:0.1.0"), (f"{WORKER}.image", DELETE)],
        [
            "Additional properties are not allowed ('imagee' was unexpected)",
            "spec.worker.spec.containers.0.imagee: dropped by the Kubernetes client",
            f"{WORKER}: no image",
        ],
    ),
    ("memory-not-a-quantity", [(f"{WORKER}.resources.limits.memory", "lots")], ["'lots' is not a Kubernetes quantity"]),
    ("memory-a-number", [(f"{WORKER}.resources.limits.memory", 16)], ["16 is not of type 'string'"]),
    ("port-a-string", [(f"{SCHEDULER}.ports.0.containerPort", "8786")], ["'8786' is not of type 'integer'"]),
    ("port-out-of-range", [(f"{SCHEDULER}.ports.0.containerPort", 2**40)], ["is greater than the maximum"]),
    (
        "duplicate-port",
        [(f"{SCHEDULER}.ports.1.containerPort", 8786)],
        ["duplicate entry", "no port http-dashboard 8787"],
    ),
    ("probe-port-a-number", [(f"{SCHEDULER}.readinessProbe.httpGet.port", 8787)], ["8787 is not of type 'string'"]),
    ("scheduler-port-moved", [(f"{SCHEDULER}.ports.0.containerPort", 8000)], ["no port tcp-comm 8786"]),
    (
        "target-port-unknown",
        [("spec.scheduler.service.ports.0.targetPort", "comm")],
        ["targetPort 'comm' is not a port of the scheduler", "no port tcp-comm 8786 with targetPort tcp-comm"],
    ),
    ("no-service", [("spec.scheduler.service", DELETE)], ["'service' is a required property"]),
    ("replicas-a-string", [("spec.worker.replicas", "4")], ["'4' is not of type 'integer'"]),
    (
        "limit-below-request",
        [(f"{WORKER}.resources.requests.memory", "32Gi")],
        ["the memory limit 16Gi is below the request 32Gi"],
    ),
    ("memory-limit-above-the-pod", [(f"{WORKER}.args.6", "20GiB")], ["--memory-limit 20GiB"]),
    ("threads-without-cores", [(f"{WORKER}.args.4", "8")], ["--nthreads 8"]),
    ("threads-not-a-number", [(f"{WORKER}.args.4", "four")], ["the worker's arguments"]),
    (
        "untagged-image",
        [(f"{SCHEDULER}.image", "registry.example.org/symphony-dask")],
        ["has no tag", "the scheduler runs 'registry.example.org/symphony-dask', the workers"],
    ),
    ("other-image", [(f"{WORKER}.image", "registry.example.org/symphony-dask:0.2.0")], ["the workers"]),
    ("bad-name", [("metadata.name", "Symphony_1")], ["metadata.name: The DaskCluster Symphony_1 is invalid"]),
    ("wrong-kind", [("kind", "DaskJob")], ["not a DaskCluster"]),
]


def _edit(resource: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with DELETE remove) the field at the dotted ``path`` (list indices as numbers)."""
    *parents, last = path.split(".")
    node: Any = resource
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key: Any = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


@pytest.mark.parametrize(("edits", "expected"), [pytest.param(e, x, id=i) for i, e, x in BROKEN])
def test_broken_daskcluster_is_rejected(kubernetes_tools, edits, expected):
    """Each broken copy of kubernetes-daskcluster.yaml fails the checks, saying what is wrong: the checks can fail."""
    resource = _yaml(CLUSTER_CONFIGS / "kubernetes-daskcluster.yaml")
    for path, value in edits:
        _edit(resource, path, value)
    problems = _daskcluster_problems(resource)
    for message in expected:
        assert any(message in problem for problem in problems), (message, problems)


def _commands(shell: str) -> list[str]:
    """The simple commands of a shell line (split at ``&&``, ``||`` and ``;``), whitespace normalized."""
    return [" ".join(part.split()) for part in re.split(r"&&|\|\||;", shell) if part.strip()]


def test_dockerfile_installs_as_the_readme_says():
    """The image installs symphony_dask with the README's install command, run in the directory the Dockerfile copies
    the project to, and copies every file that install needs."""
    readme = (CLUSTER_CONFIGS.parent / "README.md").read_text()
    quick_start = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.DOTALL).group(1)
    [install] = [c for c in _commands(quick_start) if "pip install" in c]
    assert install == "python -m pip install ."
    dockerfile = re.sub(r"\\\n", " ", (CLUSTER_CONFIGS / "Dockerfile").read_text())
    instructions = [line.split(None, 1) for line in dockerfile.splitlines() if line.strip() and line[0] != "#"]
    runs = [_commands(rest) for word, rest in instructions if word == "RUN"]
    [run] = [commands for commands in runs if any("pip install" in c for c in commands)]
    assert [c for c in run if "pip install" in c] == [install]
    assert run[: run.index(install)] == ["cd /src"]
    copied = {Path(source).name for word, rest in instructions if word == "COPY" for source in rest.split()[:-1]}
    assert {"pyproject.toml", "README.md", "LICENSE", "symphony_dask"} <= copied
