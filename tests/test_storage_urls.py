"""Storage URLs with any password: accepted and masked, or one line that shows none of it."""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpo.cli import app
from hpo.storage import StorageError, mask_url, resolve_storage_url

passwords = st.text(
    alphabet=string.ascii_letters + string.digits + "@:/#?%!$&'()*+,;=[]~-._",
    min_size=8,
    max_size=24,
).filter(lambda p: any(c.isalnum() for c in p) and "%" not in p)


def _leaks(text: str, password: str, url: str) -> bool:
    """True if ``text`` shows the password or any 4-character run of it that is not also
    part of the rest of the URL (which is shown on purpose)."""
    rest = url.replace(password, "\x00")
    runs = {password[i : i + 4] for i in range(len(password) - 3)}
    return any(run in text and run not in rest for run in runs)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    scheme=st.sampled_from(["postgresql", "postgresql+psycopg", "mysql+pymysql", "mariadb"]),
    password=passwords,
    host=st.sampled_from(["127.0.0.1", "localhost", "127.0.0.1:5432", "[::1]:3306"]),
)
@example(scheme="postgresql", password="p@ss:w0rd", host="127.0.0.1")
@example(scheme="postgresql", password="p@ss@w0rd", host="127.0.0.1")
@example(scheme="postgresql", password="xy@zz?q@k", host="127.0.0.1")
@example(scheme="postgresql", password="0000user", host="127.0.0.1")
def test_a_url_is_usable_and_masked_or_one_line_without_the_password(
    scheme: str, password: str, host: str
) -> None:
    url = f"{scheme}://hpo11user:{password}@{host}/hpo11_db"
    try:
        resolve_storage_url(url)
    except StorageError as error:
        message = str(error)
        assert "\n" not in message
        assert not _leaks(message, password, url), message
        return
    assert not _leaks(mask_url(url), password, url), mask_url(url)


@pytest.mark.parametrize(
    "url", ["postgresql://u:p@ss:w0rd@127.0.0.1/x", "postgresql://u:pw@[::1/x"]
)
def test_an_unparseable_url_is_exit_2_in_one_line(url: str) -> None:
    result = CliRunner().invoke(app, ["status", "--study", "x", "--storage", url])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "w0rd" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("foo://x/y", "unknown scheme 'foo'"),
        ("postgres://u:Secr3tPw@127.0.0.1/x", "unknown scheme 'postgres'"),
        ("oracle+cx_oracle://u@h/x", "unknown scheme 'oracle+cx_oracle'"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("sqlite:///file:x?mode=memory&uri=true", "in-memory SQLite"),
    ],
)
@pytest.mark.parametrize("command", ["status", "launch"])
def test_an_unusable_scheme_or_a_memory_database_is_one_line(
    tiny_study, url: str, words: str, command: str
) -> None:
    args = [command, "--study", "tiny", "--storage", url]
    result = CliRunner().invoke(app, args + (["--workers", "2"] if command == "launch" else []))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and words in result.output
    assert "Secr3tPw" not in result.output and "Traceback" not in result.output
