"""Checking the `{field}`s of a template's format strings, with one-line errors naming the field."""

from __future__ import annotations

import string

from qatune.data.records import DataError


def check_fields(key: str, fmt: str, allowed: set[str], required: set[str]) -> None:
    if not isinstance(fmt, str):
        raise DataError(f"template: field {key!r} must be a string")
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as e:
        raise DataError(f"template: field {key!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    bad = names - allowed
    if bad:
        raise DataError(f"template: field {key!r} uses {{{sorted(bad)[0]}}}; allowed: {sorted(allowed)}")
    if not required <= names:
        raise DataError(f"template: field {key!r} must contain {' and '.join('{' + r + '}' for r in sorted(required))}")
