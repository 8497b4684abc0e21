"""Best-fit-decreasing packing over a bounded window of documents.

Documents arrive as a stream. The packer holds at most one window of them (bounded by a count and
a token total, so memory does not grow with the dataset), sorts the window by decreasing length
(ties: arrival order) and puts each into the open pack with the least room that still fits it
(ties: the oldest pack), opening a new pack when none fits. After each window the packs are
emitted in creation order, except the `carry_packs` packs with the most room left, which stay open
for the next window's documents. Everything is deterministic: the same stream gives the same packs.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Pack:
    ident: int
    room: int
    items: list[tuple[int, int, Any]] = field(default_factory=list)  # (order, length, payload)

    @property
    def length(self) -> int:
        return sum(length for _, length, _ in self.items)


class BestFitPacker:
    """Windowed best-fit-decreasing packer; `add` and `flush` return the packs that are finished."""

    def __init__(self, capacity: int, window_items: int = 16384, window_tokens: int | None = None,
                 carry_packs: int = 64):
        if capacity < 1:
            raise ValueError("pack capacity must be positive")
        self.capacity = capacity
        self.window_items = window_items
        self.window_tokens = window_tokens if window_tokens is not None else 128 * capacity
        self.carry_packs = carry_packs
        self._window: list[tuple[int, int, Any]] = []
        self._window_tokens = 0
        self._order = 0
        self._next_ident = 0
        self._open: dict[int, Pack] = {}
        self._by_room: list[tuple[int, int]] = []  # sorted (room, ident) of open packs

    def add(self, length: int, payload: Any) -> list[Pack]:
        if not 0 < length <= self.capacity:
            raise ValueError(f"item of length {length} cannot go into packs of {self.capacity}; split it first")
        self._window.append((self._order, length, payload))
        self._order += 1
        self._window_tokens += length
        if len(self._window) >= self.window_items or self._window_tokens >= self.window_tokens:
            return self._pack_window(final=False)
        return []

    @property
    def window_empty(self) -> bool:
        """True right after a window was packed: the packer's state is only its open packs."""
        return not self._window

    def state(self, payload_ref: Callable[[Any], list]) -> dict[str, Any]:
        """The open packs as JSON-able data, each payload replaced by ``payload_ref(payload)``.

        Only taken between windows (``window_empty``): then the open packs are the whole state.
        """
        if self._window:
            raise RuntimeError("packer state is only taken between windows")
        return {"order": self._order, "next_ident": self._next_ident,
                "open": [[pack.ident, pack.room, [[order, length, payload_ref(payload)]
                                                  for order, length, payload in pack.items]]
                         for pack in self._open.values()]}

    def restore(self, state: dict[str, Any], payload_of: Callable[[list], Any]) -> None:
        """Continue from ``state()`` (same capacity and window settings); ``payload_of`` undoes ``payload_ref``."""
        self._window, self._window_tokens = [], 0
        self._order, self._next_ident = state["order"], state["next_ident"]
        self._open = {}
        for ident, room, items in state["open"]:
            self._open[ident] = Pack(ident, room, [(order, length, payload_of(ref)) for order, length, ref in items])
        self._by_room = sorted((pack.room, pack.ident) for pack in self._open.values())

    def flush(self) -> list[Pack]:
        return self._pack_window(final=True)

    def _place(self, order: int, length: int, payload: Any) -> None:
        position = bisect.bisect_left(self._by_room, (length, -1))
        if position < len(self._by_room):
            room, ident = self._by_room.pop(position)
            pack = self._open[ident]
        else:
            pack = Pack(self._next_ident, self.capacity)
            self._open[pack.ident] = pack
            self._next_ident += 1
        pack.items.append((order, length, payload))
        pack.room -= length
        bisect.insort(self._by_room, (pack.room, pack.ident))

    def _pack_window(self, final: bool) -> list[Pack]:
        window = sorted(self._window, key=lambda item: (-item[1], item[0]))
        self._window, self._window_tokens = [], 0
        for order, length, payload in window:
            self._place(order, length, payload)
        if final:
            keep: set[int] = set()
        else:
            roomiest = sorted(self._by_room, key=lambda entry: (-entry[0], -entry[1]))
            keep = {ident for room, ident in roomiest[: self.carry_packs] if room > 0}
        finished = [self._open.pop(ident) for ident in sorted(self._open) if ident not in keep]
        self._by_room = [entry for entry in self._by_room if entry[1] in keep]
        for pack in finished:
            pack.items.sort(key=lambda item: item[0])  # documents in arrival order inside a pack
        return finished
