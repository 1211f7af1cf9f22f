"""The Dockerfile and deploy/requirements.lock: no Docker here, so the Dockerfile is parsed
and the pins are checked against pyproject.toml and against this environment (the one the
tests run in; ``.ci/run`` installs exactly the lock's versions)."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "deploy" / "requirements.lock"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)(?: ; (.+))?")
REGENERATE = "regenerate deploy/requirements.lock with the command at its top"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), " ".join(rest.split())))
    return found


def pins() -> dict[str, tuple[str, str | None]]:
    """{canonical name: (version, marker)} of the lock's lines that apply to this Python."""
    applying = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.fullmatch(line.strip())
        assert match, f"not an exact pin: {line!r}"
        name, version, marker = match.groups()
        if marker is None or Requirement(f"x ; {marker}").marker.evaluate():
            assert canonicalize_name(name) not in applying, f"{name} pinned twice"
            applying[canonicalize_name(name)] = (version, marker)
    return applying


def test_the_base_image_is_a_pinned_python_release_of_the_tests_python() -> None:
    (base,) = [args for word, args in instructions() if word == "FROM"]
    match = re.fullmatch(r"python:(\d+)\.(\d+)\.(\d+)-slim", base)
    assert match, f"FROM {base}: pin the patch release (python:X.Y.Z-slim)"
    assert tuple(map(int, match.groups()[:2])) == sys.version_info[:2]


def test_pip_installs_only_pinned_versions_and_no_registry_is_named() -> None:
    runs = [args for word, args in instructions() if word == "RUN" and "pip install" in args]
    assert runs
    for run in runs:
        for command in re.split(r"&&", run):
            if "pip install" not in command:
                continue
            words = command.split()[command.split().index("install") + 1 :]
            assert "--no-deps" in words, command
            targets = [w for w in words if not w.startswith("-")]
            for target in targets:
                assert target in ("requirements.lock", ".") or re.fullmatch(
                    r"[\w.-]+==[\w.]+", target
                ), f"unpinned: {target}"
    text = (ROOT / "Dockerfile").read_text() + LOCK.read_text()
    for forbidden in ("--index-url", "--extra-index-url", "--find-links", "http://", "https://"):
        assert forbidden not in text, forbidden
    copies = [args for word, args in instructions() if word == "COPY"]
    assert "deploy/requirements.lock ./" in copies


def test_the_image_runs_as_the_unprivileged_uid_the_k8s_pods_use() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users and users[-1] == "10001:10001"
    for path in (ROOT / "deploy" / "k8s" / "base").glob("*.yaml"):
        for uid in re.findall(r"runAs(?:User|Group): (\d+)", path.read_text()):
            assert uid == "10001", path.name


def test_every_dependency_is_pinned_within_pyproject_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for line in project["dependencies"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name} not pinned; {REGENERATE}"
        assert requirement.specifier.contains(pinned[name][0], prereleases=True), (
            f"{name}=={pinned[name][0]} outside {requirement.specifier}; {REGENERATE}"
        )
        for extra in requirement.extras:  # e.g. psycopg[binary]: its extra's packages too
            for needed in metadata.requires(requirement.name) or []:
                wanted = Requirement(needed)
                if wanted.marker and wanted.marker.evaluate({**default_environment(), "extra": extra}) and "extra" in str(wanted.marker):  # fmt: skip
                    assert canonicalize_name(wanted.name) in pinned, wanted.name


def test_the_pins_are_this_environment_and_closed_under_dependencies() -> None:
    """Each pin is the version installed here (where the tests run), and every package a
    pinned package requires is pinned too (the image installs with --no-deps)."""
    pinned = pins()
    for name, (version, _) in pinned.items():
        installed = metadata.version(name)
        assert installed == version, f"{name}: {installed} here, {version} pinned; {REGENERATE}"
        for needed in metadata.requires(name) or []:
            requirement = Requirement(needed)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                assert canonicalize_name(requirement.name) in pinned, (
                    f"{name} needs {requirement.name}, not pinned"
                )
