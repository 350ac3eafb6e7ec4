"""Reading text and JSON that came from outside (uploads, request bodies) without surprises.

`json.loads` raises JSONDecodeError for bad syntax, but RecursionError for deep nesting and
plain ValueError for an integer too long to convert; bytes may not be UTF-8; and a JSON
escape like "\\ud800" decodes to a lone surrogate that no UTF-8 encoder (so no tokenizer)
takes. These helpers turn all of that into one ValueError whose message says what is wrong.
"""

from __future__ import annotations

import json


def is_text(value: str) -> bool:
    """False for a str that is not valid Unicode (it holds a lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_json(data: str | bytes) -> object:
    """The JSON value in `data`, or ValueError("not UTF-8 text ..." / "not valid JSON (...)")."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise ValueError(f"not valid JSON ({error})") from None
