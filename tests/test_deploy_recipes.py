"""deploy/: every recipe parses and hangs together (Docker, Compose and Kubernetes do not run
here, so these are the checks that can be made without them), and the Dask scheduler and
worker command lines of each recipe start from this environment exactly as written (local
ports and 127.0.0.1 in place of the recipe's hosts) and the worker joins the scheduler."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"


def test_every_recipe_folder_has_a_readme() -> None:
    for folder in ("docker", "compose", "kubernetes", "slurm"):
        assert (DEPLOY / folder / "README.md").is_file(), folder


# --- Dockerfiles -------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in pairs]


def test_there_is_a_cpu_and_a_cuda_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_what_exists_and_installs_the_package(dockerfile: Path) -> None:
    from packaging.requirements import Requirement

    steps = dockerfile_instructions(dockerfile)
    kinds = [kind for kind, _ in steps]
    sources = [
        source
        for kind, args in steps
        if kind in ("COPY", "ADD")
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]

    assert kinds[0] in ("FROM", "ARG") and "FROM" in kinds
    for source in sources:  # the build context is the repository root
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"
    for link in (ROOT / "src" / "segflow").iterdir():  # the wheel follows these links
        if link.is_symlink():
            assert link.resolve().relative_to(ROOT.resolve()).as_posix() in sources
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    torch = Requirement(
        next(r for r in PYPROJECT["project"]["dependencies"] if r.startswith("torch"))
    )
    pinned = re.search(r'"torch==([^"]+)"', runs)
    assert pinned and torch.specifier.contains(pinned.group(1))
    extras = re.findall(r'pip install "\.\[([a-z,]+)\]"', runs)
    assert extras and set(extras[0].split(",")) <= set(
        PYPROJECT["project"]["optional-dependencies"]
    )
    assert any(kind == "USER" and args != "root" for kind, args in steps)
    command = json.loads(next(args for kind, args in steps if kind == "CMD"))
    assert command[0] in PYPROJECT["project"]["scripts"]


def test_the_build_context_leaves_out_the_venv_and_git() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "outputs"} <= set(ignored)


# --- docker compose ----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def test_compose_has_the_prefect_and_dask_services() -> None:
    services = compose()["services"]
    commands = {name: " ".join(s.get("command", [])) for name, s in services.items()}

    assert services["postgres"]["image"].startswith("postgres:")
    assert commands["prefect-server"].startswith("prefect server start")
    assert commands["dask-scheduler"].startswith("dask scheduler")
    assert commands["dask-worker"].startswith("dask worker tcp://dask-scheduler:8786")
    assert commands["prefect-worker"].startswith(
        "prefect worker start --pool ${PREFECT_DEFAULT_WORK_POOL_NAME:-segflow}"
    )
    assert "--resources GPU=1" in commands["dask-gpu-worker"]
    database = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert database.startswith("postgresql+asyncpg://")


def test_compose_references_resolve() -> None:
    spec = compose()
    services = spec["services"]
    declared_volumes = set(spec.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
            assert context == ROOT.resolve(), name
            assert (context / service["build"]["dockerfile"]).is_file(), name
        depends = service.get("depends_on") or []
        for other in depends if isinstance(depends, list) else depends.keys():
            assert other in services, f"{name} depends on unknown service {other}"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0]
            assert source.startswith((".", "/")) or source in declared_volumes, (name, source)
        for value in (service.get("environment") or {}).values():
            host = urlsplit(str(value)).hostname if "://" in str(value) else None
            assert host in (None, "localhost", *services), f"{name}: {value}: no such service"
        command = service.get("command") or []
        if command:  # executables the image has: this environment's console scripts
            assert (Path(sys.executable).parent / command[0]).exists(), (name, command[0])


def test_compose_flow_runs_share_the_scheduler_and_the_store_volume() -> None:
    services = compose()["services"]
    worker = services["prefect-worker"]
    scheduler_port = services["dask-scheduler"]["command"][
        services["dask-scheduler"]["command"].index("--port") + 1
    ]

    assert (
        worker["environment"]["DASK_SCHEDULER_ADDRESS"] == f"tcp://dask-scheduler:{scheduler_port}"
    )
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    for name in ("prefect-worker", "dask-worker", "dask-gpu-worker"):
        assert "outputs:/opt/segflow/outputs" in services[name]["volumes"], name
    prefect_file = services["deploy"]["command"][
        services["deploy"]["command"].index("--prefect-file") + 1
    ]
    assert (ROOT / prefect_file).is_file()  # the image's /opt/segflow mirrors the repository


# --- Kubernetes --------------------------------------------------------------------------


def kubernetes_objects() -> dict[str, dict[str, Any]]:
    documents = yaml.safe_load_all((KUBERNETES / "dask-cluster.yaml").read_text())
    return {document["kind"]: document for document in documents}


def base_job_template() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((KUBERNETES / "base-job-template.json").read_text())
    return loaded


def test_kubernetes_objects_are_well_formed_and_refer_to_each_other() -> None:
    objects = kubernetes_objects()
    cluster, gpu_group, claim = (
        objects["DaskCluster"],
        objects["DaskWorkerGroup"],
        objects["PersistentVolumeClaim"],
    )

    for document in objects.values():
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(document)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", document["metadata"]["name"])
    assert cluster["apiVersion"] == gpu_group["apiVersion"] == "kubernetes.dask.org/v1"
    assert gpu_group["spec"]["cluster"] == cluster["metadata"]["name"]
    ports = {p["port"] for p in cluster["spec"]["scheduler"]["service"]["ports"]}
    assert 8786 in ports
    gpu_container = gpu_group["spec"]["worker"]["spec"]["containers"][0]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "GPU=1" in gpu_container["args"]
    for pods in (cluster["spec"]["worker"]["spec"], gpu_group["spec"]["worker"]["spec"]):
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pods["volumes"]}
        assert claims == {claim["metadata"]["name"]}
        assert "ReadWriteMany" in claim["spec"]["accessModes"]


def test_the_base_job_template_declares_every_placeholder_and_a_valid_schema() -> None:
    import jsonschema
    from prefect.utilities.templating import find_placeholders

    template = base_job_template()
    declared = set(template["variables"]["properties"])

    used = {p.name for p in find_placeholders(template["job_configuration"])}

    assert used <= declared, used - declared
    jsonschema.Draft202012Validator.check_schema(template["variables"])
    defaults = {
        k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v
    }
    jsonschema.validate(defaults, template["variables"])


def test_the_base_job_template_renders_a_job_with_a_gpu_limit_and_the_shared_cluster() -> None:
    from prefect.utilities.templating import apply_values

    template = base_job_template()
    properties = template["variables"]["properties"]
    values = {k: v["default"] for k, v in properties.items() if "default" in v}
    values |= {"gpus": 1, "name": "segflow-run", "command": "prefect flow-run execute"}

    job = apply_values(template["job_configuration"], values)["job_manifest"]

    # The parts prefect-kubernetes's worker requires of a job manifest.
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert (pod["restartPolicy"], pod["parallelism"], pod["completions"]) == ("Never", 1, 1)
    container = pod["containers"][0]
    assert container["name"] == "prefect-job"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    cluster = kubernetes_objects()["DaskCluster"]["metadata"]["name"]
    address = values["env"]["DASK_SCHEDULER_ADDRESS"]
    assert address == f"tcp://{cluster}-scheduler.{values['namespace']}.svc.cluster.local:8786"
    claim = kubernetes_objects()["PersistentVolumeClaim"]["metadata"]["name"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


def test_the_helm_values_use_the_charts_keys_and_our_prefect_version() -> None:
    values = yaml.safe_load((KUBERNETES / "prefect-worker-values.yaml").read_text())
    worker = values["worker"]
    prefect_version = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())["prefect-version"]

    assert set(values) == {"worker"}
    assert set(worker) <= {"image", "config", "apiConfig", "selfHostedServerApiConfig", "resources"}
    # The enums of the prefect-worker chart's values.schema.json.
    assert worker["apiConfig"] in ("cloud", "customerManagedCloud", "selfHostedServer")
    assert worker["config"]["installPolicy"] in ("always", "if-not-present", "never", "prompt")
    assert worker["config"]["type"] == "kubernetes"
    assert worker["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    assert worker["image"]["prefectTag"].startswith(f"{prefect_version}-python3.11")


# --- SLURM -------------------------------------------------------------------------------


def slurm_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "segflow_slurm", DEPLOY / "slurm" / "segflow_slurm.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_slurm_cluster_writes_segflow_worker_jobs(gpu: bool) -> None:
    with slurm_module().make_cluster(queue="q1", cores=8, memory="16GiB", gpu=gpu) as cluster:
        script = cluster.job_script()
        address = cluster.scheduler_address

    assert "#SBATCH -p q1" in script and "#SBATCH --cpus-per-task=8" in script
    assert urlsplit(address).scheme == "tcp" and urlsplit(address).port
    if gpu:
        assert "#SBATCH --gres=gpu:1" in script
        assert "--resources GPU=1" in script and "--nworkers" not in script
    else:
        assert "--gres" not in script and "--resources" not in script
        assert "--nworkers 2" in script and "--nthreads 4" in script


@contextmanager
def ports_held(*ports: int) -> Iterator[None]:
    """Listen on each of ``ports`` on every interface, as another program would (a port
    some process holds already is taken anyway)."""
    with ExitStack() as stack:
        for port in ports:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("", port))
                sock.listen()
            except OSError:
                continue
        yield


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_slurm_cluster_takes_free_ports_unless_told_and_clashes_with_nothing() -> None:
    # Dask's (8786, 8787) and Prefect's (4200) usual ports held by others: the cluster
    # starts anyway, without a "port already in use" warning (an error in the tests).
    with ports_held(8786, 8787, 4200):
        with slurm_module().make_cluster(queue="q1") as cluster:
            ports = {
                urlsplit(cluster.scheduler_address).port,
                urlsplit(cluster.dashboard_link).port,
            }
        assert not ports & {8786, 8787, 4200}

        port, dashboard_port = free_port(), free_port()
        with slurm_module().make_cluster(
            queue="q1", port=port, dashboard_port=dashboard_port
        ) as cluster:  # a firewall rule or an SSH tunnel names them
            assert urlsplit(cluster.scheduler_address).port == port
            assert urlsplit(cluster.dashboard_link).port == dashboard_port


# --- prefect.yaml ------------------------------------------------------------------------


def test_prefect_yaml_has_only_keys_prefect_reads() -> None:
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, WorkPoolConfig

    raw = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())

    PrefectYamlModel.model_validate(raw)
    for deployment in raw["deployments"]:
        # Prefect ignores unknown keys (a misspelt `retries:` would be dropped silently).
        assert set(deployment) <= set(DeploymentConfig.model_fields), deployment["name"]
        assert set(deployment["work_pool"]) <= set(WorkPoolConfig.model_fields)


# --- the recipes' commands, started ------------------------------------------------------

BIN = Path(sys.executable).parent  # the installed environment: what the image installs
START_TIMEOUT = 60.0  # seconds for a scheduler or worker to start; measured 3-8 s here


@contextmanager
def started(command: list[str], env: dict[str, str] | None = None) -> Iterator[None]:
    """Run ``command`` (its executable from this environment) until the block ends."""
    executable = shutil.which(command[0], path=str(BIN))
    assert executable, f"{command[0]!r}: no such executable in {BIN}"
    process = subprocess.Popen(
        [executable, *command[1:]],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def local_ports(command: list[str], ports: dict[str, int]) -> list[str]:
    """``command`` with each port the recipe names (``8786``, ``:8787``, or in an address)
    replaced by a local one, and the recipe's scheduler host by 127.0.0.1."""
    out = []
    for arg in command:
        for recipe_port, port in ports.items():
            arg = re.sub(rf"(^|:){recipe_port}$", rf"\g<1>{port}", arg)
        out.append(re.sub(r"^tcp://[^:/]+:", "tcp://127.0.0.1:", arg))
    return out


def joined_workers(address: str, n: int) -> dict[str, Any]:
    """The scheduler's workers once ``n`` have joined (within :data:`START_TIMEOUT`)."""
    from distributed import Client

    with Client(address, timeout=START_TIMEOUT) as client:
        client.wait_for_workers(n, timeout=START_TIMEOUT)
        workers: dict[str, Any] = client.scheduler_info(n_workers=-1)["workers"]
        return workers


def expand_kubernetes(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of container args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in args]


def test_the_kubernetes_scheduler_and_workers_start_with_the_recipes_args() -> None:
    import httpx

    objects = kubernetes_objects()
    scheduler = objects["DaskCluster"]["spec"]["scheduler"]["spec"]["containers"][0]
    cpu = objects["DaskCluster"]["spec"]["worker"]["spec"]["containers"][0]
    gpu = objects["DaskWorkerGroup"]["spec"]["worker"]["spec"]["containers"][0]
    ports = {8786: free_port(), 8787: free_port()}
    address = f"tcp://127.0.0.1:{ports[8786]}"
    # What the dask-kubernetes operator gives each worker container.
    operator_env = {"DASK_SCHEDULER_ADDRESS": address, "DASK_WORKER_NAME": "segflow-worker-x"}
    gpu_env = {**operator_env, "DASK_WORKER_NAME": "segflow-gpu-worker-y"}

    assert "command" not in scheduler and "command" not in cpu  # args: the whole command
    with ExitStack() as stack:
        stack.enter_context(started(local_ports(scheduler["args"], ports)))
        stack.enter_context(started(expand_kubernetes(cpu["args"], operator_env), operator_env))
        stack.enter_context(started(expand_kubernetes(gpu["args"], gpu_env), gpu_env))
        workers = joined_workers(address, 2)
        # The probes' path on the dashboard port.
        health = httpx.get(f"http://127.0.0.1:{ports[8787]}/health", timeout=10)

    by_name = {w["name"]: w for w in workers.values()}
    assert set(by_name) == {"segflow-worker-x", "segflow-gpu-worker-y"}
    assert by_name["segflow-gpu-worker-y"]["resources"] == {"GPU": 1}  # 1.0 compares equal
    assert by_name["segflow-worker-x"]["nthreads"] == 2
    assert (health.status_code, health.text) == (200, "ok")


def test_the_compose_scheduler_and_worker_start_with_the_recipes_commands() -> None:
    services = compose()["services"]
    ports = {8786: free_port(), 8787: free_port()}
    address = f"tcp://127.0.0.1:{ports[8786]}"

    with ExitStack() as stack:
        for name in ("dask-scheduler", "dask-worker", "dask-gpu-worker"):
            stack.enter_context(started(local_ports(services[name]["command"], ports)))
        workers = joined_workers(address, 2)

    assert sorted(w["resources"].get("GPU", 0) for w in workers.values()) == [0, 1]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_slurm_job_scripts_worker_joins_the_cluster(gpu: bool) -> None:
    # A job's command line as its batch script runs it, on this machine: the scheduler
    # is the script's own (on a free port of this host).
    with slurm_module().make_cluster(queue="q1", cores=2, memory="2GiB", gpu=gpu) as cluster:
        command = cluster.job_script().strip().splitlines()[-1]
        with started(shlex.split(command)):
            workers = joined_workers(cluster.scheduler_address, 1 if gpu else 2)

    assert all(w["resources"] == ({"GPU": 1} if gpu else {}) for w in workers.values())


# --- users and the work pool --------------------------------------------------------------


def test_pods_run_as_the_images_user_and_may_write_the_shared_volume() -> None:
    objects = kubernetes_objects()
    pods = [
        objects["DaskCluster"]["spec"]["worker"]["spec"],
        objects["DaskCluster"]["spec"]["scheduler"]["spec"],
        objects["DaskWorkerGroup"]["spec"]["worker"]["spec"],
        base_job_template()["job_configuration"]["job_manifest"]["spec"]["template"]["spec"],
    ]
    for pod in pods:
        assert pod["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
    for dockerfile in DOCKERFILES:
        runs = " ".join(args for kind, args in dockerfile_instructions(dockerfile) if kind == "RUN")
        assert "--uid 1000 --gid 1000 segflow" in runs and "--gid 1000 segflow" in runs
        assert ("USER", "segflow") in dockerfile_instructions(dockerfile)


def test_the_work_pool_is_one_variable_in_prefect_yaml_and_the_recipes() -> None:
    variable = "PREFECT_DEFAULT_WORK_POOL_NAME"
    raw = yaml.safe_load((DEPLOY / "prefect.yaml").read_text())
    services = compose()["services"]
    worker = services["prefect-worker"]["command"]

    # prefect deploy gives a deployment without work_pool.name this setting's pool.
    assert all("name" not in d["work_pool"] for d in raw["deployments"])
    assert worker[worker.index("--pool") + 1] == f"${{{variable}:-segflow}}"
    assert services["deploy"]["environment"][variable] == f"${{{variable}:-segflow}}"
    kubernetes = (KUBERNETES / "README.md").read_text()
    assert f"--set worker.config.workPool=${variable}" in kubernetes
    assert f"export {variable}=segflow-kubernetes" in kubernetes
