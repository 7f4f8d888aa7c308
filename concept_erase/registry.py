"""Name -> implementation tables, so methods plug in without the trainer knowing them."""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from concept_erase.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """`providers`: modules that register entries when imported (plug-ins living in their own packages, such as
    a built-in model's judge); they are imported the first time the table is read."""

    def __init__(self, kind: str, flag: str, providers: tuple[str, ...] = ()):
        self.kind = kind  # e.g. "lambda controller"
        self.flag = flag  # the command-line flag that picks one, for error messages
        self._items: dict[str, T] = {}
        self._providers = providers

    def _load(self) -> None:
        if self._providers:
            providers, self._providers = self._providers, ()
            for module in providers:
                importlib.import_module(module)

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str, flag: str | None = None) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise UserError(
                f"unknown {self.kind} {name!r} for {flag or self.flag}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items
