"""Names and references: `math` (newest), `math-latest`, `math-v3`, or an alias like `math-prod`.

Names are lower-case and short so they are safe as folder names: no path traversal, no
separators, and never ending in `-v<digits>` or `-latest`, which would make references ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prompt_store.errors import InvalidNameError

NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62}[a-z0-9])?$")
_VERSIONED = re.compile(r"^(?P<name>.+)-v(?P<version>[1-9][0-9]{0,8})$")
_RESERVED_SUFFIX = re.compile(r"(-v[0-9]+|-latest)$")
LATEST_SUFFIX = "-latest"


def validate_name(name: str, *, kind: str = "prompt name") -> str:
    """Return `name` if it is a valid prompt or alias name, else raise InvalidNameError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidNameError(
            f"Invalid {kind} {name!r}: use 1-64 characters from a-z, 0-9, '-' and '_', "
            "starting and ending with a letter or digit."
        )
    if _RESERVED_SUFFIX.search(name):
        raise InvalidNameError(
            f"Invalid {kind} {name!r}: it may not end in '-v<number>' or '-latest'; those suffixes select versions."
        )
    return name


@dataclass(frozen=True, order=True)
class VersionId:
    """One published version: `name-vN`."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}-v{self.version}"


@dataclass(frozen=True)
class ParsedRef:
    """A reference split into its parts; `version` is None for `name`/`name-latest`/aliases."""

    name: str
    version: int | None


def parse_ref(ref: str) -> ParsedRef:
    """Split `math-v3` into (math, 3); `math` and `math-latest` into (math, None).

    An alias also parses as (alias, None); the store tells names and aliases apart.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidNameError("Empty prompt reference: give a name like 'math' or 'math-v2'.")
    match = _VERSIONED.match(ref)
    if match:
        return ParsedRef(validate_name(match["name"]), int(match["version"]))
    if ref.endswith(LATEST_SUFFIX):
        return ParsedRef(validate_name(ref[: -len(LATEST_SUFFIX)]), None)
    return ParsedRef(validate_name(ref, kind="prompt reference"), None)
