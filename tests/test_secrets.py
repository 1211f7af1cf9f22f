"""A password never printed, wherever the URL holds it: userinfo, query, libpq key=value."""

from __future__ import annotations

import logging
import string
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hpo.cli import app
from hpo.cli.app import _mask_record, one_line
from hpo.secrets import mask_secrets
from hpo.storage.urls import mask_url, safe_detail

SCHEMES = ["postgresql", "postgresql+psycopg", "mysql+pymysql", "mariadb", "sqlite", "foo+bar"]
HOSTS = ["127.0.0.1", "localhost", "127.0.0.1:5432", "[::1]:3306", ""]
SECRET_KEYS = ["password", "PASSWORD", "Password", "sslpassword", "passwd", "pass%77ord", "pwd"]
OTHER = ["sslmode=disable", "application_name=hpo", "connect_timeout=5", "user=me"]
secrets_ = st.text(
    alphabet=string.ascii_letters + string.digits + "@:/#?%!$&'()*+,;=[]~-._ \\\"",
    min_size=8,
    max_size=24,
).filter(lambda s: sum(c.isalnum() for c in s) >= 4)


def _leaks(text: str, secret: str, shown: str) -> bool:
    """True if ``text`` shows any 4-character run of ``secret`` (raw or percent-encoded)
    that is not also part of ``shown``, the text around the secret."""
    for form in {secret, quote(secret, safe="")}:
        runs = {form[i : i + 4] for i in range(len(form) - 3)}
        if any(run in text and run not in shown for run in runs):
            return True
    return False


@st.composite
def urls_with_a_secret(draw: st.DrawFn) -> tuple[str, str, str]:
    """(url, secret, the url without the secret): the secret in one of every position."""
    scheme, host = draw(st.sampled_from(SCHEMES)), draw(st.sampled_from(HOSTS))
    secret = draw(secrets_)
    others = draw(st.lists(st.sampled_from(OTHER), max_size=3))
    at = draw(st.integers(0, len(others)))
    form = draw(st.sampled_from(["userinfo", "query", "conninfo", "query-conninfo"]))
    base = f"{scheme}://{host}/hpo_db"
    if form == "userinfo":
        clean = secret.replace(" ", "x").replace("\\", "x")
        url = f"{scheme}://me:{clean}@{host}/hpo_db" + ("?" + "&".join(others) if others else "")
        return url, clean, url.replace(clean, "")
    if form == "query":
        key = draw(st.sampled_from(SECRET_KEYS))
        encoded = quote(secret, safe=draw(st.sampled_from(["", "!$'()*,;:@/"])))
        params = [*others[:at], f"{key}={encoded}", *others[at:]]
        url = f"{base}?{'&'.join(params)}"
        return url, secret, url.replace(encoded, "")
    quoted = "'" + secret.replace("\\", "\\\\").replace("'", "\\'") + "'"
    value = quoted if draw(st.booleans()) or not secret.isalnum() else secret
    key = draw(st.sampled_from(["password", "sslpassword"]))
    conninfo = " ".join([*others[:at], f"{key}={value}", *others[at:]])
    if form == "conninfo":
        return conninfo, secret, conninfo.replace(value, "")
    encoded = quote(conninfo, safe="")
    url = f"{base}?dsn={encoded}"
    return url, secret, url.replace(quote(value, safe=""), "")


@settings(derandomize=True, max_examples=600, deadline=None)
@given(case=urls_with_a_secret(), before=st.sampled_from(["", "cannot open ", "(", "'", '"']))
def test_no_secret_survives_masking_in_any_position(
    case: tuple[str, str, str], before: str
) -> None:
    url, secret, shown = case
    assert not _leaks(mask_url(url), secret, shown), mask_url(url)
    message = f"{before}{url}{'):' if before == '(' else before} connection refused"
    around = message.replace(url, shown)  # a run of the secret in "connection" is no leak
    assert not _leaks(mask_secrets(message), secret, around), mask_secrets(message)
    assert not _leaks(one_line(message), secret, around)


def test_masking_keeps_what_is_not_secret() -> None:
    assert mask_url("postgresql://u:pw@h:5/db?sslmode=disable&password=x") == (
        "postgresql://u:***@h:5/db?sslmode=disable&password=***"
    )
    assert mask_url("host=h password='a b' dbname=d") == "host=h password=*** dbname=d"
    assert mask_url("sqlite:////tmp/a@b:c/hpo.db") == "sqlite:////tmp/a@b:c/hpo.db"


def test_a_driver_error_quoting_a_query_password_is_masked() -> None:
    url = "postgresql+psycopg://me@127.0.0.1/db?password=Sup3rS3cret"
    error = RuntimeError("connection failed: password=Sup3rS3cret rejected")
    assert "Sup3rS3cret" not in safe_detail(error, url)


def test_log_lines_are_masked() -> None:
    record = logging.LogRecord(
        "x", logging.INFO, "f", 1, "lost %s", ("mysql://u:Hidden99@h/d",), None
    )
    _mask_record(record)
    assert "Hidden99" not in record.getMessage()


def test_cli_never_prints_a_query_password() -> None:
    url = "postgresql+psycopg://me@127.0.0.1:1/hpo_db?password=Qu3ryS3cret&connect_timeout=2"
    result = CliRunner().invoke(app, ["status", "--study", "x", "--storage", url])
    assert result.exit_code == 2, result.output
    assert "Qu3ryS3cret" not in result.output
    assert "127.0.0.1" in result.output
