"""The per-thread KV state cache: a chat thread's saved sequence state, kept in RAM between turns.

When a thread's slot is taken by another thread, its KV state (``llama_state_seq_get_data``)
is parked here, keyed by its model, its LoRA adapter set and its thread; when the thread comes
back (under the same adapters), the state is restored into a free slot. Bounded by bytes, least recently used out first.

A saved state is only ever *offered* for its own thread, and the engine restores it only
when the new prompt really starts with the tokens the state holds (compared token by
token, as far as they agree): a thread can never be given another thread's state, and a
stale entry can never stand in for a changed history.

The one other kind of entry is a bot's *shared prefix*: the state of exactly the tokens up to
the end of a system turn (persona, instructions, tool definitions; never a user's turn, where
retrieved documents live), keyed by model, adapter set and those exact tokens. It is copied
(:meth:`StateCache.peek`, not taken) into the slot of any new thread whose prompt starts with
the same tokens under the same adapters, and used only as far as the tokens agree.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SavedState:
    tokens: tuple[int, ...]
    # An anonymous memory map (the engine's), or bytes. A map of its own per state, rather than
    # a bytes object, gives the memory back to the system the moment the state is dropped:
    # malloc'd blocks of a few MB come back as heap fragments that RSS never loses.
    data: mmap.mmap | bytes

    def free(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()


class StateCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, SavedState] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: Hashable, state: SavedState) -> None:
        """Keep ``state`` as ``key``'s latest; evict the least recently used past the bound."""
        self.drop(key)
        if len(state.data) > self.max_bytes:
            self.evictions += 1  # larger than the whole cache: not kept
            state.free()
            return
        self._entries[key] = state
        self.bytes += len(state.data)
        while self.bytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old.data)
            self.evictions += 1
            old.free()

    def take(self, key: Hashable) -> SavedState | None:
        """Remove and return ``key``'s state (it moves into a slot; the taker frees it)."""
        state = self._entries.pop(key, None)
        if state is not None:
            self.bytes -= len(state.data)
        return state

    def peek(self, key: Hashable) -> SavedState | None:
        """``key``'s state, left in the cache (marked recently used): for states that are copied
        into slots rather than moved (a bot's shared prefix). Valid until the next :meth:`put`,
        which may evict it."""
        state = self._entries.get(key)
        if state is not None:
            self._entries.move_to_end(key)
        return state

    def drop(self, key: Hashable) -> None:
        state = self.take(key)
        if state is not None:
            state.free()

    def clear(self) -> None:
        for state in self._entries.values():
            state.free()
        self._entries.clear()
        self.bytes = 0


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
