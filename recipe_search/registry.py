"""One registry class for every pluggable concept: model families, search methods, selection rules
and optimisers. Like peft's `register_peft_method`, a name can be registered once; looking up an
unknown name is a one-line error that lists the known ones."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, refusing duplicates."""

    def __init__(self, concept: str) -> None:
        self.concept = concept
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.concept} {name!r} is already registered ({self._describe(self._items[name])})")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(f"unknown {self.concept} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    @staticmethod
    def _describe(item: object) -> str:
        return getattr(item, "__name__", type(item).__name__)
