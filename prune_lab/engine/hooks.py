"""Forward / backward hooks registered together and removed together, whatever happens in between."""
from __future__ import annotations

from torch.utils.hooks import RemovableHandle


class Hooks:
    """`with Hooks() as hooks: hooks.add(module.register_forward_hook(fn)) ...`: every handle added
    is removed on exit (also on an exception); `add` returns the handle."""

    def __init__(self):
        self.handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> RemovableHandle:
        self.handles.append(handle)
        return handle

    def __enter__(self) -> "Hooks":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
