"""Sequence specs a caller names, from one directory: how the HTTP API and the MCP tools
find the spec a request or an agent asks for, with the same rules for both."""

from __future__ import annotations

import re
from pathlib import Path

from postlane.errors import InvalidInput, InvalidSpec
from postlane.sequences.spec import SequenceSpec, load_spec

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SpecDirectory:
    """The specs in one directory, found by name or file, never outside it.

    Args:
        root: the directory; a spec is ``<root>/<name>.toml``, or any ``*.toml`` file in
            it whose ``name`` is the one asked for, or a ``.toml`` path inside it.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """The names of the valid specs in the directory."""
        found = []
        for path in sorted(self.root.glob("*.toml")):
            try:
                found.append(load_spec(path).name)
            except InvalidInput:
                continue  # postlane.toml and other files that are no spec
        return found

    def load(self, spec: str) -> SequenceSpec:
        """The spec `spec` names.

        Raises:
            InvalidSpec: field ``spec``: no such spec, a path outside the directory, or a
                spec file that does not load (its reason names the file and field).
        """
        root = self.root.resolve()
        if spec.endswith(".toml"):
            path = (root / spec).resolve()
            if not path.is_relative_to(root):
                raise InvalidSpec("spec", f"{spec!r} is outside the spec directory {self.root}")
            return self._load(path)
        if not _NAME_RE.match(spec):
            raise InvalidSpec("spec", f"{spec!r} is not a spec name or a .toml file")
        named = root / f"{spec}.toml"
        if named.is_file():
            return self._load(named)
        for path in sorted(root.glob("*.toml")):
            try:
                loaded = load_spec(path)
            except InvalidInput:
                continue
            if loaded.name == spec:
                return loaded
        known = ", ".join(self.names()) or "none"
        raise InvalidSpec("spec", f"no spec named {spec!r} in {self.root} (specs: {known})")

    @staticmethod
    def _load(path: Path) -> SequenceSpec:
        try:
            return load_spec(path)
        except InvalidInput as exc:
            raise InvalidSpec("spec", f"{exc.field}: {exc.reason}") from None
