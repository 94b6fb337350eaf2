"""`AdapterRef`: the one place where `name` / `name@version` is parsed and written.

A client names an adapter as `base` (the frozen backbone), `name` (its latest version) or
`name@version`; a loaded adapter is keyed `name@version` (or `base`). Everything else passes the
type, never the string: nothing outside this module splits on `@`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BASE = "base"
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"  # DESIGN.md §4: adapter names and versions
REF_PATTERN = rf"^{NAME_PATTERN}(@{NAME_PATTERN})?$"  # the JSON schema's pattern for an adapter reference
_REF = re.compile(REF_PATTERN)
_NAME = re.compile(NAME_PATTERN)


class RefError(ValueError):
    """A string that is not `base`, `name` or `name@version`; `code` is `invalid_name`."""

    code = "invalid_name"


@dataclass(frozen=True, order=True)
class AdapterRef:
    """An adapter reference: `name`, and `version` or None for "the latest"."""

    name: str
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> "AdapterRef":
        """`base` / `name` / `name@version` -> AdapterRef; anything else raises RefError."""
        if not isinstance(text, str) or not _REF.fullmatch(text):
            raise RefError(f"adapter {str(text)[:140]!r} is not base, name or name@version (lower-case letters, digits, . _ -)")
        return cls(*cls.split(text))

    @classmethod
    def of(cls, name: str, version: str | None = None) -> "AdapterRef":
        """A reference from its two parts (as the Open Inference Protocol sends them), each checked as `parse` checks it."""
        if not isinstance(name, str) or not _NAME.fullmatch(name) or (version and (not isinstance(version, str) or not _NAME.fullmatch(version))):
            shown = f"{name}@{version}" if version else name
            raise RefError(f"adapter {str(shown)[:140]!r} is not base, name or name@version (lower-case letters, digits, . _ -)")
        return cls(name, version or None)

    @staticmethod
    def split(text: str) -> tuple[str, str | None]:
        """`name@version` -> (name, version); (name, None) without one. No validation: the model
        store checks each part with its own rules (`metalora.bundle.check_name`)."""
        name, _, version = text.partition("@")
        return name, version or None

    @classmethod
    def key_of(cls, name: str, version: str) -> str:
        """The key of a loaded version: `name@version`."""
        return str(cls(name, version))

    @property
    def is_base(self) -> bool:
        return self.name == BASE and self.version is None

    def with_version(self, version: str | None) -> "AdapterRef":
        return AdapterRef(self.name, version)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def name_of(key: str) -> str:
    """The adapter name of a key or reference (`cifar10@6` -> `cifar10`, `base` -> `base`)."""
    return AdapterRef.parse(key).name


def version_of(key: str) -> str:
    """The version of a key (`cifar10@6` -> `6`); `""` for `base` or a reference without one."""
    return AdapterRef.parse(key).version or ""
