"""Secrets out of everything hpo prints: the one masking function for every URL form.

A database password can sit in three places, and all three are valid for the drivers hpo
uses: the URL's userinfo (``postgresql://user:SECRET@host/db``), the URL's query
(``postgresql://host/db?password=SECRET``, also percent-encoded keys such as
``pass%77ord``), and libpq's key=value form (``host=h password=SECRET`` or
``password='SE CRET'``), which also appears inside a query value (``?dsn=...``) and in
driver messages. ``mask_secrets`` replaces each of them by ``***`` in any text;
``storage.mask_url`` and ``storage.safe_detail`` and the CLI's error line all go through it.

Masking errs towards hiding too much: from ``user:`` up to the last ``@`` of a URL (a
password may itself hold ``@``, ``/``, ``?`` or ``#``), and a whole query value whose key
names a secret (any key containing ``pass``, ``secret``, ``token`` or ``pwd``).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote_plus

MASK = "***"

# libpq key=value: a key naming a secret, '=', then a quoted value (backslash escapes) or a
# bare one up to whitespace (or '&', which ends it inside a URL query).
_SECRET_KEY = r"[\w.-]*(?:pass|secret|token|pwd)[\w.-]*"
_KEY_VALUE = re.compile(
    rf"(?i)(?<![\w.-])({_SECRET_KEY})(\s*=\s*)('(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&]*)"
)
# A URL's start: scheme '://' (the userinfo, if any, follows).
_SCHEME = re.compile(r"(?i)[a-z][a-z0-9+.\-]*://")
_QUERY_PAIR = re.compile(r"([?&])([^=&?]*)=([^&]*)")
_SECRET_NAME = re.compile(r"(?i)pass|secret|token|pwd")


def names_a_secret(key: str) -> bool:
    """True for a query or conninfo key whose value is a secret (password, sslpassword...)."""
    return _SECRET_NAME.search(unquote_plus(key)) is not None


def _mask_key_values(text: str) -> str:
    return _KEY_VALUE.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def _mask_pair(match: re.Match[str]) -> str:
    """One ``?key=value`` or ``&key=value`` of a URL query, its secret masked (keys are
    compared decoded, as drivers read them; a conninfo string inside a value is masked)."""
    lead, key, value = match.groups()
    if names_a_secret(key):
        return f"{lead}{key}={MASK}"
    decoded = unquote_plus(value)
    masked = _mask_key_values(decoded)
    if masked != decoded:
        value = quote(masked, safe="*=' ")
    return f"{lead}{key}={value}"


def _mask_userinfo(rest: str) -> str:
    """What follows ``scheme://``, with ``user:password@`` shown as ``user:***@``.

    The password runs to the last '@' (SQLAlchemy stops at the first, but an unescaped '@'
    in a password must not leave its tail visible); a user name holds no ':' or '/'.
    """
    match = re.match(r"([^:/@?#]*):(.*)@", rest, flags=re.DOTALL)
    if match is None:
        return rest
    return f"{match.group(1)}:{MASK}@{rest[match.end() :]}"


def mask_url(url: str) -> str:
    """One URL with every password in it replaced by ``***`` (safe to print or log).

    Query secrets first (a value runs to the next '&', so one holding '@' is hidden whole),
    then the userinfo, then any key=value secret left.
    """
    start = _SCHEME.match(url)
    if start is None:  # not a URL: a libpq conninfo string, a path, or garbage
        return _mask_key_values(url)
    rest = _QUERY_PAIR.sub(_mask_pair, url[start.end() :])
    return url[: start.end()] + _mask_key_values(_mask_userinfo(rest))


def mask_secrets(text: str, known: tuple[str, ...] = ()) -> str:
    """Any text (an error message, a log line) with every URL and key=value secret masked,
    and every string in ``known`` (passwords this process holds) replaced by ``***``."""
    for secret in sorted({s for s in known if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    # A URL runs from its scheme to the next whitespace (after a quote or a bracket too),
    # less the punctuation that closes the sentence around it ("(URL): refused"): left as
    # it is, not taken into the URL and re-encoded.
    text = re.sub(
        r"(?i)([a-z][a-z0-9+.\-]*://)(\S*?)(?=[)\]}>'\",;:.]*(?:\s|$))",
        lambda m: m.group(1) + mask_url(m.group(0))[len(m.group(1)) :],
        text,
    )
    return _mask_key_values(text)
