"""The project speaks of the project: docs, study files, code comments and file names say
what hpo is and does, not when or in which piece of work it was done. No work-log words (a
numbered stop of a work session), no issue numbers; history lives in git."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A work-log reference: a numbered stop ("stop", "stops", then a number; also hyphenated or
# run together) or an issue number ("issue", "Issue #", run together, or a branch name
# "issue-N"). The planted examples below are built from these two words, so that this file
# holds none itself. Plain words pass: "stops the worker", "non-stop", "the issue tracker".
STOP, ISSUE = "stop", "issue"
WORK_LOG = re.compile(
    r"\b[Ss]tops? [0-9]+\b"
    r"|\b[Ss]top-?[0-9]+\b"
    r"|\b[Ii]ssues? #?[0-9]+\b"
    r"|[Ii]ssue[-_]?[0-9]+"
)
# A file named after a piece of work: an issue number or a stop anywhere in its name.
WORK_LOG_NAME = re.compile(r"stop|issue[-_ ]?[0-9]+", re.IGNORECASE)


def work_log_lines(paths: list[Path]) -> list[str]:
    """Every line of ``paths`` that holds a work-log reference, as "path:line: text"."""
    found = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            if WORK_LOG.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    return found


def _files(pattern: str) -> list[Path]:
    return sorted(path for path in REPO.glob(pattern) if path.is_file())


def _assert_clean(paths: list[Path]) -> None:
    assert paths, "nothing to check: the glob found no file"
    found = work_log_lines(paths)
    assert not found, "work-log words or issue numbers:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "text",
    [
        f"as measured in {STOP} 23",
        f"{STOP.title()} 18's grid",
        f"(docs/benchmarks.md, {STOP}s 23 and 24)",
        f"the {STOP}-20 demo",
        f"policy {STOP}20",
        f"{ISSUE} 12",
        f"{ISSUE.title()} 9: a search fair to every batch size",
        f"see {ISSUE} #13",
        f"answer_quality_{ISSUE}9_cheaper.json",
        f"branch {ISSUE}-10",
    ],
)
def test_the_pattern_catches_work_log_words_and_issue_numbers(text: str) -> None:
    assert WORK_LOG.search(text)


@pytest.mark.parametrize(
    "text",
    [
        "SIGTERM stops the worker",
        "docker compose stop worker",
        "non-stop",
        "Issue tracker",
        "the issue's goal",
        "issues with PgBouncer",
        "stop starting trials after 60 seconds",
        "it stops workers 1…N−1",
    ],
)
def test_the_pattern_leaves_plain_text_alone(text: str) -> None:
    assert not WORK_LOG.search(text)


def test_the_readme_and_docs_speak_of_the_project() -> None:
    _assert_clean([REPO / "README.md", *_files("docs/**/*.md")])


def test_the_study_files_speak_of_the_project() -> None:
    _assert_clean(_files("studies/*"))


def test_the_benchmark_scripts_speak_of_the_project() -> None:
    _assert_clean(_files("benchmarks/*.py"))


def test_hpos_code_speaks_of_the_project() -> None:
    _assert_clean(_files("hpo/**/*.py"))


def test_no_doc_or_result_file_is_named_after_an_issue_or_a_stop() -> None:
    paths = _files("docs/**/*") + _files("benchmarks/results/**/*")
    named = [str(path.relative_to(REPO)) for path in paths if WORK_LOG_NAME.search(path.name)]
    assert not named, "files named after a piece of work: " + ", ".join(named)


@pytest.mark.parametrize(
    "name, flagged",
    [
        (f"storage_scale_{ISSUE}12.json", True),
        (f"gpu_h200_{ISSUE}13.json", True),
        (f"{STOP}24.json", True),
        ("storage_scale_cpu.json", False),
        ("answer_quality_catch_up_5seeds_cpu.json", False),
        ("noise-scale.md", False),
    ],
)
def test_the_name_pattern_catches_issue_and_stop_names(name: str, flagged: bool) -> None:
    assert bool(WORK_LOG_NAME.search(name)) is flagged
