"""The directory tree as the engine knows it: names by directory, parents by inode.

Kept separate from the engine so path resolution has one bounded implementation: a hostile
image can make a directory its own ancestor, so :meth:`Namespace.path` stops after
``MAX_DEPTH`` components and marks an unresolvable prefix as ``<ino N>``.

Resolved paths are memoised until the next :meth:`add` or :meth:`remove` (the only changes
to ``parents``): a settle names thousands of entries of a few directories between changes.
"""

from __future__ import annotations

import contextlib

from blocktrace.ext4.constants import EXT4_ROOT_INO

MAX_DEPTH = 4096


class Namespace:
    def __init__(self) -> None:
        self.children: dict[int, dict[str, int]] = {}
        self.parents: dict[int, list[tuple[int, str]]] = {}
        self._paths: dict[int, str] = {}  #: ino -> path, valid until parents change

    def add(self, parent: int, name: str, ino: int) -> None:
        self._paths.clear()
        names = self.children.setdefault(parent, {})
        old = names.get(name)
        if old is not None and old != ino:
            self.remove(parent, name, old)
        names[name] = ino
        links = self.parents.setdefault(ino, [])
        if (parent, name) not in links:
            links.append((parent, name))

    def remove(self, parent: int, name: str, ino: int) -> None:
        self._paths.clear()
        names = self.children.get(parent)
        if names is not None and names.get(name) == ino:
            del names[name]
        links = self.parents.get(ino)
        if links is not None:
            with contextlib.suppress(ValueError):
                links.remove((parent, name))
            if not links:
                del self.parents[ino]

    def forget(self, ino: int) -> None:
        """Drop what is left of a freed inode (its own children map, if a directory)."""
        self.children.pop(ino, None)

    def links(self, ino: int) -> list[tuple[int, str]]:
        return list(self.parents.get(ino, ()))

    def join(self, parent: int, name: str) -> str:
        base = self.path(parent)
        return f"/{name}" if base == "/" else f"{base}/{name}"

    def path(self, ino: int) -> str:
        known = self._paths.get(ino)
        if known is None:
            known = self._paths[ino] = self._resolve(ino)
        return known

    def _resolve(self, ino: int) -> str:
        if ino == EXT4_ROOT_INO:
            return "/"
        parts: list[str] = []
        cur = ino
        seen: set[int] = set()
        while cur != EXT4_ROOT_INO:
            links = self.parents.get(cur)
            if not links or cur in seen or len(parts) >= MAX_DEPTH:
                parts.append(f"<ino {cur}>")
                break
            seen.add(cur)
            parent, name = links[0]
            parts.append(name)
            cur = parent
        else:
            return "/" + "/".join(reversed(parts))
        return "/".join(reversed(parts))
