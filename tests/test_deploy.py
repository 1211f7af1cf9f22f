"""deploy/: the Kubernetes manifests and the Slurm job-array script. No cluster runs here,
so they are parsed and the fields the worker relies on are checked; each command they run
is parsed by hpo's own CLI, so a renamed option fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from hpo.cli import app

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
SBATCH = ROOT / "deploy" / "slurm" / "hpo-worker.sbatch"


def _documents() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[(document["kind"], document["metadata"]["name"])] = document
    return found


MANIFESTS = _documents()


def _parses_as_hpo_command(argv: list[str]) -> typer.Context:
    """``argv`` (starting with ``hpo``) parsed by the real CLI, without running it."""
    assert argv[0].endswith("hpo"), argv
    group = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), argv[1])
    assert command is not None, f"no hpo command {argv[1]!r}"
    return command.make_context(argv[1], argv[2:])


def _secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    return {
        item["name"]: (ref["name"], ref["key"])
        for item in container.get("env", [])
        if (ref := item.get("valueFrom", {}).get("secretKeyRef"))
    }


def test_manifests_are_the_secret_worker_job_and_dashboard() -> None:
    assert set(MANIFESTS) == {
        ("Secret", "hpo-storage"),
        ("Job", "hpo-workers"),
        ("Deployment", "hpo-dashboard"),
        ("Service", "hpo-dashboard"),
    }
    for (kind, _), document in MANIFESTS.items():
        expected = {"Job": "batch/v1", "Deployment": "apps/v1"}.get(kind, "v1")
        assert document["apiVersion"] == expected


def test_secret_holds_the_storage_url_without_a_real_password() -> None:
    secret = MANIFESTS[("Secret", "hpo-storage")]
    url = secret["stringData"]["HPO_STORAGE"]
    assert url.startswith("postgresql+psycopg://")
    assert ":REPLACE-ME@" in url


def test_worker_job_runs_one_gpu_worker_per_indexed_pod() -> None:
    job = MANIFESTS[("Job", "hpo-workers")]["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] == job["completions"] >= 1
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    context = _parses_as_hpo_command(container["command"])
    assert context.info_name == "worker"
    assert context.params["gpus"] == "all" and context.params["study"]
    assert _secret_refs(container) == {"HPO_STORAGE": ("hpo-storage", "HPO_STORAGE")}
    # SIGTERM re-queues the running trial within seconds; Kubernetes' default 30 s grace
    # is too tight for a slow database.
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert env["HPO_CHECKPOINT_DIR"] in mounts


def test_dashboard_listens_in_the_pod_and_stays_inside_the_cluster() -> None:
    deployment = MANIFESTS[("Deployment", "hpo-dashboard")]["spec"]
    service = MANIFESTS[("Service", "hpo-dashboard")]["spec"]
    (container,) = deployment["template"]["spec"]["containers"]
    context = _parses_as_hpo_command(container["command"])
    assert context.info_name == "dashboard"
    assert context.params["host"] == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == context.params["port"]
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    labels = deployment["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    assert _secret_refs(container) == {"HPO_STORAGE": ("hpo-storage", "HPO_STORAGE")}


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
    seconds = re.fullmatch(r"B:TERM@(\d+)", options["signal"])
    assert seconds and int(seconds.group(1)) >= 60
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0


def test_slurm_script_execs_the_worker_so_it_receives_the_signal() -> None:
    (line,) = [line for line in SBATCH.read_text().splitlines() if line.startswith("exec ")]
    argv = shlex.split(line.replace('"${HPO_STUDY:-histo}"', "histo"))[1:]
    context = _parses_as_hpo_command(argv)
    assert context.info_name == "worker" and context.params["gpus"] == "all"


@pytest.mark.parametrize("text", ["--storage", "PASSWORD="])
def test_no_launcher_writes_a_storage_url_or_password_inline(text: str) -> None:
    assert text not in SBATCH.read_text()
    for path in K8S.glob("*.yaml"):
        for line in path.read_text().splitlines():
            if text in line and not line.lstrip().startswith("#"):
                pytest.fail(f"{path.name}: {line.strip()}")
