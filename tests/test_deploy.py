"""deploy/: the Kubernetes kustomize base and overlays, and the Slurm job-array script.

Both overlays are rendered with kustomize (``kubectl kustomize``), every rendered object is
validated against the Kubernetes schemas (``kubernetes-validate``, offline), and every
Secret, ConfigMap, PVC and Service a pod or URL names must be among the rendered objects.
Each command the manifests run is parsed by hpo's own CLI, so a renamed option fails here.
The read-only database role's init script runs against the local PostgreSQL."""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import kubernetes_validate
import optuna
import psycopg
import pytest
import typer
import yaml
from sqlalchemy.engine import make_url

from hpo.cli import app

from .databases import scratch_database

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SBATCH = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"
OVERLAYS = ("gpu", "gpu-data-parallel", "cpu-test")
KUBERNETES_VERSION = "1.30"
POD_KINDS = {"Deployment", "StatefulSet", "Job"}


def _render(overlay: str, tmp_path: Path) -> list[dict]:
    """``kubectl kustomize`` of the overlay, on a copy of deploy/k8s whose secrets/*.env are
    the committed templates (a real deployment writes them with real passwords)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (with its built-in kustomize) is needed to render deploy/k8s")
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy, ignore=shutil.ignore_patterns("*.env"))
    for template in (copy / "base" / "secrets").glob("*.env.example"):
        shutil.copy(template, template.with_suffix(""))
    rendered = subprocess.run(
        [kubectl, "kustomize", str(copy / "overlays" / overlay)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    return request.param, _render(request.param, tmp_path_factory.mktemp(request.param))


def _by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def _named(objects: list[dict], kind: str, prefix: str) -> dict:
    """The object whose name is ``prefix`` or ``prefix`` plus kustomize's hash suffix."""
    (found,) = [
        o for n, o in _by_kind(objects, kind).items() if re.fullmatch(rf"{prefix}(-\w+)?", n)
    ]
    return found


def _pods(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in POD_KINDS}


def _container(objects: list[dict], name: str) -> dict:
    (container,) = _pods(objects)[name]["spec"]["containers"]
    return container


def _parses_as_hpo_command(argv: list[str], env: dict[str, str] | None = None) -> typer.Context:
    """``argv`` (starting with ``hpo``, ``$(VAR)`` expanded from ``env`` as Kubernetes
    does) parsed by the real CLI, without running it."""
    argv = [re.sub(r"\$\((\w+)\)", lambda m: (env or {})[m.group(1)], part) for part in argv]
    assert argv[0].endswith("hpo"), argv
    group = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), argv[1])
    assert command is not None, f"no hpo command {argv[1]!r}"
    return command.make_context(argv[1], argv[2:])


def _data(obj: dict) -> dict[str, str]:
    if obj["kind"] != "Secret":
        return obj.get("data", {})
    decoded = {k: base64.b64decode(v).decode() for k, v in obj.get("data", {}).items()}
    return {**decoded, **obj.get("stringData", {})}


def _config(objects: list[dict]) -> dict[str, str]:
    return _data(_named(objects, "ConfigMap", "hpo-config"))


def test_every_rendered_object_validates_against_the_kubernetes_schema(rendered) -> None:
    overlay, objects = rendered
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "Secret", "ConfigMap", "PersistentVolumeClaim", "StatefulSet",
            "Deployment", "Service", "Job"} <= kinds, kinds  # fmt: skip
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {error.message}")
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "hpo"


def test_a_schema_violation_is_caught() -> None:
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"completions": "many", "template": {"spec": {"containers": []}}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def test_every_secret_configmap_pvc_and_service_named_is_defined(rendered) -> None:
    _, objects = rendered
    secrets = {n: _data(o) for n, o in _by_kind(objects, "Secret").items()}
    configs = {n: _data(o) for n, o in _by_kind(objects, "ConfigMap").items()}
    claims = set(_by_kind(objects, "PersistentVolumeClaim"))
    for owner, template in _pods(objects).items():
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if claim := volume.get("persistentVolumeClaim"):
                assert claim["claimName"] in claims, (owner, claim)
            if config := volume.get("configMap"):
                assert config["name"] in configs, (owner, config)
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if ref := source.get("secretRef"):
                    assert ref["name"] in secrets, (owner, ref)
                if ref := source.get("configMapRef"):
                    assert ref["name"] in configs, (owner, ref)
            for item in container.get("env", []):
                if ref := item.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in secrets[ref["name"]], (owner, ref)
                if ref := item.get("valueFrom", {}).get("configMapKeyRef"):
                    assert ref["key"] in configs[ref["name"]], (owner, ref)
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in _claim_templates(objects, owner)
            }, owner
    services = _by_kind(objects, "Service")
    storage = _data(_named(objects, "Secret", "hpo-storage"))
    for url in storage.values():
        parsed = make_url(url)
        assert parsed.host in services, url
        ports = {p["port"] for p in services[parsed.host]["spec"]["ports"]}
        assert parsed.port in ports, url
    pgbouncer_env = {e["name"]: e.get("value") for e in _container(objects, "pgbouncer")["env"]}
    assert pgbouncer_env["DB_HOST"] in services
    for name, service in services.items():  # every Service selects a pod and a named port
        selected = [t for t in _pods(objects).values()
                    if service["spec"]["selector"].items() <= t.get("metadata", {}).get("labels", {}).items()]  # fmt: skip
        assert selected, name
        port_names = {p.get("name") for c in selected[0]["spec"]["containers"] for p in c["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"]), name


def _claim_templates(objects: list[dict], owner: str) -> list[dict]:
    owners = [o for o in objects if o["metadata"]["name"] == owner and o["kind"] == "StatefulSet"]
    return owners[0]["spec"].get("volumeClaimTemplates", []) if owners else []


def test_images_are_pinned_and_not_pulled_every_start(rendered) -> None:
    _, objects = rendered
    for owner, template in _pods(objects).items():
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (
                owner, image
            )  # fmt: skip
            assert container["imagePullPolicy"] == "IfNotPresent", owner


def test_worker_job_has_requests_and_runs_the_configured_study(rendered) -> None:
    overlay, objects = rendered
    job = _by_kind(objects, "Job")["hpo-workers"]["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] >= 1
    pod = job["template"]["spec"]
    container = _container(objects, "hpo-workers")
    config = _config(objects)
    context = _parses_as_hpo_command(container["command"], config)
    assert context.info_name == "worker"
    assert context.params["study"] == config["HPO_STUDY"] == context.params["spec_file"]
    assert (ROOT / "studies" / f"{config['HPO_STUDY']}.toml").is_file()  # baked into the image
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] == container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {config["HPO_CHECKPOINT_DIR"], config["HPO_DATA_ROOT"]} <= mounts
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    checkpoints = _by_kind(objects, "PersistentVolumeClaim")["hpo-checkpoints"]
    assert "hpo-checkpoints" in claims and checkpoints["spec"]["accessModes"] == ["ReadWriteMany"]
    if overlay.startswith("gpu"):
        assert context.params["gpus"] == "all"
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert gpus == (4 if overlay == "gpu-data-parallel" else 1)
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["nodeSelector"]
        assert gpus == 1 or "/dev/shm" in mounts  # NCCL between a pod's ranks
    else:
        assert config["HPO_DEVICE"] == "cpu" and "nvidia.com/gpu" not in str(container)
        assert job["completions"] <= 4


def test_create_and_report_jobs_run_hpo_on_the_same_study(rendered) -> None:
    _, objects = rendered
    config = _config(objects)
    create = _parses_as_hpo_command(_container(objects, "hpo-create-study")["command"], config)
    assert create.info_name == "create" and create.params["study"] == config["HPO_STUDY"]
    report_job = _by_kind(objects, "Job")["hpo-report"]
    assert report_job["spec"]["suspend"] is True  # started once the workers are done
    report = _parses_as_hpo_command(_container(objects, "hpo-report")["command"], config)
    assert report.info_name == "report" and report.params["study"] == config["HPO_STUDY"]
    dashboard = _parses_as_hpo_command(_container(objects, "hpo-dashboard")["command"])
    assert report.params["artifacts"] == dashboard.params["artifacts"]


def test_dashboard_asks_for_credentials_is_read_only_and_has_probes(rendered) -> None:
    _, objects = rendered
    container = _container(objects, "hpo-dashboard")
    context = _parses_as_hpo_command(container["command"])
    assert context.params["host"] == "0.0.0.0" and context.params["read_only"] is True
    assert not context.params["no_auth"]
    (secret_ref,) = [s["secretRef"]["name"] for s in container["envFrom"]]
    auth = _data(_by_kind(objects, "Secret")[secret_ref])
    assert set(auth) == {"HPO_DASHBOARD_USER", "HPO_DASHBOARD_PASSWORD"}
    (storage,) = [e["valueFrom"]["secretKeyRef"] for e in container["env"]]
    url = make_url(_data(_by_kind(objects, "Secret")[storage["name"]])[storage["key"]])
    postgres = _data(_named(objects, "Secret", "hpo-postgres"))
    assert url.username == postgres["READONLY_USER"] != postgres["POSTGRES_USER"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(context.params["artifacts"]) in mounts
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe], probe
    service = _by_kind(objects, "Service")["hpo-dashboard"]["spec"]
    assert service.get("type", "ClusterIP") == "ClusterIP"


def test_secret_templates_hold_placeholders_and_real_files_are_ignored() -> None:
    templates = sorted((K8S / "base" / "secrets").glob("*.env.example"))
    assert len(templates) == 3
    for template in templates:
        for line in template.read_text().splitlines():
            if "PASSWORD" in line or "://" in line:
                assert "REPLACE-ME" in line, line
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(K8S / "base" / "secrets" / "storage.env")], cwd=ROOT
    )
    assert ignored.returncode == 0


@pytest.mark.db
def test_postgres_init_script_makes_a_role_the_dashboard_can_only_read_with(
    tmp_path: Path,
) -> None:
    """The init script of the PostgreSQL StatefulSet, run as its entrypoint would (before
    any table exists): the role then reads what hpo writes later, and writes nothing."""
    from hpo.dashboard import make_server

    objects = _render("cpu-test", tmp_path)
    script = _data(_by_kind(objects, "ConfigMap")["hpo-postgres-init"])["readonly-role.sh"]
    role, password = f"cl_ro_{uuid.uuid4().hex[:8]}", "ro-pw"
    with scratch_database("postgresql", prefix="cl_") as url:
        owner = make_url(url)
        env = {"POSTGRES_USER": owner.username, "POSTGRES_DB": owner.database,
               "READONLY_USER": role, "READONLY_PASSWORD": password,
               "PGHOST": owner.host, "PGPORT": str(owner.port), "PATH": "/usr/bin:/bin"}  # fmt: skip
        try:
            run = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
            assert run.returncode == 0, run.stderr
            optuna.create_study(storage=url, study_name="ro-study").optimize(
                lambda trial: trial.suggest_float("x", 0, 1), n_trials=2
            )
            readonly = owner.set(username=role, password=password)
            server = make_server(readonly.render_as_string(hide_password=False), port=0,
                                 artifact_dir=tmp_path / "artifacts")  # fmt: skip
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            try:
                port = server.server_address[1]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as answer:
                    assert b"ro-study" in answer.read()
            finally:
                server.shutdown()
                server.server_close()
            readonly_dsn = readonly.set(drivername="postgresql")
            with (
                psycopg.connect(readonly_dsn.render_as_string(hide_password=False)) as connection,
                pytest.raises(psycopg.errors.InsufficientPrivilege),
            ):
                connection.execute("DELETE FROM trials")
        finally:  # the role's grants live in the database: drop it first, then the role
            with psycopg.connect(owner.set(drivername="postgresql", database="postgres")
                                 .render_as_string(hide_password=False), autocommit=True) as c:  # fmt: skip
                c.execute(f"DROP DATABASE IF EXISTS {owner.database} WITH (FORCE)")
                c.execute(f'DROP ROLE IF EXISTS "{role}"')


def _sbatch_options() -> dict[str, str]:
    options = {}
    for line in SBATCH.read_text().splitlines():
        if match := re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            options[match.group(1)] = match.group(2) or ""
    return options


def test_slurm_script_is_a_job_array_with_one_gpu_and_an_early_sigterm() -> None:
    options = _sbatch_options()
    assert re.fullmatch(r"\d+-\d+(%\d+)?", options["array"])
    assert options["gres"] == "gpu:1"
    assert re.fullmatch(r"\d+[GM]", options["mem"]) and int(options["cpus-per-task"]) >= 1
    seconds = re.fullmatch(r"B:TERM@(\d+)", options["signal"])
    assert seconds and int(seconds.group(1)) >= 60
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def test_slurm_script_execs_the_worker_so_it_receives_the_signal() -> None:
    (line,) = [line for line in SBATCH.read_text().splitlines() if line.startswith("exec ")]
    argv = shlex.split(line.replace('"${HPO_STUDY:-histo}"', "histo"))[1:]
    assert argv[0] == "$HPO"
    assert 'HPO="${HPO_HOME}/.venv/bin/hpo"' in SBATCH.read_text()
    context = _parses_as_hpo_command(["hpo", *argv[1:]])
    assert context.info_name == "worker" and context.params["gpus"] == "all"


def test_slurm_script_sets_up_the_node_before_the_worker() -> None:
    """Data root, checkpoints and threads exported with defaults; HPO_SETUP sourced; a
    missing environment is one clear line and exit 2 (run here without Slurm)."""
    text = SBATCH.read_text()
    for variable in ("HPO_DATA_ROOT", "HPO_CHECKPOINT_DIR", "HPO_NUM_THREADS"):
        assert re.search(rf'^export {variable}="\$\{{{variable}:-', text, re.MULTILINE), variable
    run = subprocess.run(
        ["bash", str(SBATCH)],
        env={"PATH": "/usr/bin:/bin", "HPO_STORAGE": "sqlite:///x.db", "HPO_HOME": "/nonexistent"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip() == (
        "error: no /nonexistent/.venv/bin/hpo: run 'uv sync' in /nonexistent first "
        "(or set HPO_HOME)"
    )


@pytest.mark.parametrize("text", ["--storage", "PASSWORD="])
def test_no_launcher_writes_a_storage_url_or_password_inline(text: str) -> None:
    assert text not in SBATCH.read_text()
    for path in K8S.rglob("*.yaml"):
        for line in path.read_text().splitlines():
            if text in line and not line.lstrip().startswith("#"):
                pytest.fail(f"{path.name}: {line.strip()}")
