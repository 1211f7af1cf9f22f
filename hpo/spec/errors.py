"""How a bad study file is refused: ``SpecError``, the one-line message that names each bad
field, and the depth check that refuses deeply nested text before a parser recurses into it.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from hpo.errors import UserError


class SpecError(UserError):
    """A study file or study name that cannot be used.

    The message is one line meant for the user: it names the file, the field and what is
    allowed. The CLI prints it and exits with code 2.
    """


def _shown(value: object, limit: int = 60) -> str:
    """A value from the file as it may appear in a one-line message: repr, shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False)[:5]:
        location = ".".join(
            str(part) if re.fullmatch(r"[A-Za-z0-9_]+", str(part)) else _shown(part)
            for part in item["loc"]
        )
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not a field of this table)"
        elif item["type"] in ("literal_error", "int_type", "float_type", "bool_type"):
            message = f"got {_shown(item['input'])}; {message[0].lower()}{message[1:]}"
        parts.append(f"{location}: {message}" if location else message)
    more = len(error.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


# A study file nests three tables deep at most. Text nested deeper is refused before it is
# parsed: tomllib and json recurse once per level, and a parser stopped by the recursion
# limit leaves no stack for anything else that runs at that depth (a garbage collector's
# finalizer then fails: "Exception ignored in ...").
MAX_NESTING = 32
TOML_TOKENS = re.compile(
    r'#[^\n]*|"""(?:\\.|[^\\])*?"""|'
    + r"'''.*?'''|"
    + r'"(?:\\.|[^"\\\n])*"|'
    + r"'[^'\n]*'|[\[\]{}]",
    re.DOTALL,
)
JSON_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|[\[\]{}]')


def too_deep(text: str, tokens: re.Pattern[str]) -> int | None:
    """The line on which brackets or braces outside strings and comments first nest more
    than MAX_NESTING deep, or None. It counts without parsing, so it needs no stack."""
    depth = 0
    for match in tokens.finditer(text):
        bracket = match.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > MAX_NESTING:
                return text.count("\n", 0, match.start()) + 1
        elif bracket in ("]", "}"):
            depth = max(depth - 1, 0)
    return None
