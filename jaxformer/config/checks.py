"""The value checks every config schema uses: each raises `UserError` with one line naming the key."""

from __future__ import annotations

from typing import Any

from jaxformer.errors import UserError


def check_positive(prefix: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise UserError(f"{prefix}.{name}={value} must be a positive number")


def check_at_least(prefix: str, obj: Any, *names: str, minimum: int = 0, hint: str = "") -> None:
    """`prefix.name=value must be >= minimum[ hint]` for each name whose value (when set) is less."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < minimum:
            raise UserError(f"{prefix}.{name}={value} must be >= {minimum}{hint}")


def check_choice(prefix: str, obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise UserError(f"{prefix}.{name}={value!r} is not one of {', '.join(choices)}")
