"""Dataclass <-> plain JSON-able dict for saved configs: the :class:`DictFields` mixin."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["DictFields"]

_T = TypeVar("_T", bound="DictFields")


class DictFields:
    """Mixin for a dataclass: :meth:`to_dict`, and :meth:`from_dict`, which
    refuses keys that are not fields.

    A subclass words that refusal (:meth:`unknown_fields_error`) and may check
    more before building (:meth:`from_known_fields`).
    """

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_T], data: Mapping[str, Any]) -> _T:
        """Build from ``data``; a key that is not a field raises
        :meth:`unknown_fields_error`."""
        names = sorted(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise cls.unknown_fields_error(unknown, names)
        return cls.from_known_fields(data)

    @classmethod
    def unknown_fields_error(cls, unknown: list[str], names: list[str]) -> Exception:
        """The error for keys ``unknown`` (``names``: every field, sorted)."""
        return ValueError(
            f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {names}"
        )

    @classmethod
    def from_known_fields(cls: type[_T], data: Mapping[str, Any]) -> _T:
        """Build from ``data``, whose keys are all fields."""
        return cls(**data)
