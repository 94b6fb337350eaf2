"""The model repository: which adapter versions on disk may serve, as Triton's model management
names it (docs/user_guide/model_management.md): control modes `none`, `poll` and `explicit`, a
version policy per adapter, and a version visible only when whole.

A version directory `adapters/<name>/<version>/` is **available** when its manifest parses and
every file it lists is there with the size and sha256 it states — checked once per change of the
files (their sizes and modification times), by `scan`, which runs off the event loop. Otherwise
it is **incomplete** (a listed file is missing or shorter than stated: a copy in progress) or
**invalid** (the manifest does not parse, a checksum or size is wrong), with the reason; a valid
version outside the adapter's version policy is **retired**. Only available versions serve, and
the latest available one is what a reference without a version means: a copy in progress, a bad
checksum or a deleted directory never turns into an error for a request that named no version.
Directories whose name starts with "." are never looked at: copy a version into
`adapters/<name>/.<version>.tmp/`, then rename it, and it appears whole at once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from metalora.bundle import MANIFEST, BundleError, check_name, read_manifest, verify_files
from metalora.refs import BASE, AdapterRef
from metalora.store import ModelStore, version_order

from .errors import DomainError, Kind, invalid, not_found

log = logging.getLogger("metalora.repository")

AVAILABLE, INCOMPLETE, INVALID, RETIRED = "available", "incomplete", "invalid", "retired"
_POLICY = re.compile(r"^(all|latest\s+([1-9]\d*))$")


@dataclass(frozen=True)
class Policy:
    """Which valid versions of an adapter serve: the `latest` N (highest version first), or all (N = None)."""

    latest: int | None = 1

    @classmethod
    def parse(cls, text: str) -> "Policy":
        m = _POLICY.fullmatch(text.strip())
        if not m:
            raise ValueError(f"version policy {text!r} is not 'all' or 'latest N' (N >= 1)")
        return cls(None if m.group(1) == "all" else int(m.group(2)))

    def __str__(self) -> str:
        return "all" if self.latest is None else f"latest {self.latest}"


def parse_policies(text: str) -> tuple[Policy, dict[str, Policy]]:
    """`METALORA_VERSION_POLICY`: a default policy and per-adapter ones, comma-separated:
    `latest 1`, `all`, `latest 2,cifar10=all`. Raises ValueError naming the bad part."""
    default, per = Policy(1), {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if "=" in part:
            name, _, pol = part.partition("=")
            try:
                check_name(name.strip())
            except BundleError as e:
                raise ValueError(f"version policy {part!r}: {e}") from None
            per[name.strip()] = Policy.parse(pol)
        else:
            default = Policy.parse(part)
    return default, per


@dataclass(frozen=True)
class VersionState:
    """One version directory as the last scan found it."""

    name: str
    version: str
    state: str  # available | incomplete | invalid | retired
    reason: str = ""  # why it does not serve ("" when available)
    code: str = ""  # the bundle error's code where it has one (checksum_mismatch, missing_file, bad_manifest, ...)

    @property
    def key(self) -> str:
        return AdapterRef.key_of(self.name, self.version)


@dataclass
class Snapshot:
    """What serves: every version directory by adapter, and the available versions in version order."""

    versions: dict[str, dict[str, VersionState]] = field(default_factory=dict)  # name -> version -> state

    def available(self, name: str) -> list[str]:
        return sorted((v for v, s in self.versions.get(name, {}).items() if s.state == AVAILABLE), key=version_order)

    def keys(self) -> set[str]:
        return {s.key for vs in self.versions.values() for s in vs.values() if s.state == AVAILABLE}


class Repository:
    """The store's adapters and their states; `scan` blocks (files are hashed), call it off the loop."""

    def __init__(self, store: ModelStore, mode: str = "poll", policy: str = "latest 1"):
        self.store = store
        self.mode = mode
        self.default_policy, self.policies = parse_policies(policy)
        self.snapshot = Snapshot()
        self._verified: dict[tuple, VersionState] = {}  # (path, files' sizes and mtimes) -> state
        self._lock = threading.Lock()  # one scan at a time

    def policy(self, name: str) -> Policy:
        return self.policies.get(name, self.default_policy)

    # ---------------------------------------------------------------- scanning
    def scan(self, names: list[str] | None = None) -> tuple[set[str], set[str]]:
        """Look at the store again (every adapter, or only `names`); returns the keys that became
        available and those that stopped being available."""
        with self._lock:
            before = self.snapshot.keys()
            versions = dict(self.snapshot.versions)
            root = self.store.root / "adapters"
            on_disk = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
            for name in on_disk if names is None else names:
                if (root / name).is_dir():
                    versions[name] = self._scan_adapter(name, root / name)
                else:
                    versions.pop(name, None)
            if names is None:
                for gone in set(versions) - set(on_disk):
                    del versions[gone]
            self.snapshot = Snapshot({n: vs for n, vs in versions.items() if vs})
            after = self.snapshot.keys()
        return after - before, before - after

    def _scan_adapter(self, name: str, d: Path) -> dict[str, VersionState]:
        try:
            check_name(name)
        except BundleError:
            return {}
        states = {}
        for p in d.iterdir():
            if not p.is_dir() or p.name.startswith("."):
                continue
            try:
                check_name(p.name, "version")
            except BundleError:
                continue
            states[p.name] = self._check(name, p.name, p)
        valid = sorted((v for v, s in states.items() if s.state == AVAILABLE), key=version_order, reverse=True)
        keep = self.policy(name).latest
        if keep is not None:
            for v in valid[keep:]:
                states[v] = VersionState(name, v, RETIRED, f"outside the version policy ({self.policy(name)})")
        return dict(sorted(states.items(), key=lambda kv: version_order(kv[0])))

    def _check(self, name: str, version: str, p: Path) -> VersionState:
        """One version directory's state, hashed only when its files changed since the last look."""
        mf = p / MANIFEST
        try:
            st = mf.stat()
        except OSError:
            return VersionState(name, version, INCOMPLETE, f"{MANIFEST} is not there yet", "missing_file")
        try:
            manifest = read_manifest(p)
        except BundleError as e:
            return VersionState(name, version, INVALID, str(e), e.code)
        files = manifest.get("files", {})
        sig = [str(p), st.st_size, st.st_mtime_ns]
        for fname, meta in files.items():
            try:
                fs = os.stat(p / fname)
                sig += [fname, fs.st_size, fs.st_mtime_ns]
            except OSError:
                return VersionState(name, version, INCOMPLETE, f"{fname} is listed in the manifest but not there (yet)", "missing_file")
            if isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and fs.st_size < meta["bytes"]:
                return VersionState(name, version, INCOMPLETE, f"{fname} is {fs.st_size} of {meta['bytes']} bytes (a copy in progress?)", "missing_file")
        key = tuple(sig)
        if key in self._verified:
            return self._verified[key]
        try:
            verify_files(p, manifest)
            state = VersionState(name, version, AVAILABLE)
        except BundleError as e:
            state = VersionState(name, version, INVALID, str(e), e.code)
        if state.state == INVALID:
            log.warning("%s@%s is not served: %s", name, version, state.reason)
        self._verified = {k: v for k, v in self._verified.items() if k[0] != str(p)}  # one entry a directory
        self._verified[key] = state
        return state

    # ---------------------------------------------------------------- lookups
    def names(self) -> list[str]:
        """Every adapter with a version directory, servable or not."""
        return sorted(self.snapshot.versions)

    def states(self, name: str) -> list[VersionState]:
        return list(self.snapshot.versions.get(name, {}).values())

    def available(self, name: str) -> list[str]:
        """The versions that serve, in version order (the last is the latest)."""
        return self.snapshot.available(name)

    def resolve(self, ref: AdapterRef, any_state: bool = False) -> str:
        """A reference -> the key of the version it names: `base`, or the latest available version,
        or the named one. NOT_FOUND `unknown_adapter` for a name or version that is not there;
        CONFLICT with the version's own code for one that is there but cannot serve — unless
        `any_state` (an unload: whatever is there, the latest directory for a bare name)."""
        if ref.is_base:
            return BASE
        if ref.name == BASE:
            raise not_found("unknown_version", "'base' (the frozen backbone) has no versions; leave the version empty")
        try:
            check_name(ref.name)
            if ref.version:
                check_name(ref.version, "version")
        except BundleError as e:
            raise invalid(e.code, str(e)) from None
        versions = self.snapshot.versions.get(ref.name)
        if not versions:
            raise not_found("unknown_adapter", f"adapter {ref.name!r} is not in the store {self.store.root}")
        if ref.version is None:
            avail = self.snapshot.available(ref.name)
            if avail:
                return AdapterRef.key_of(ref.name, avail[-1])
            latest = versions[max(versions, key=version_order)]
            if any_state:
                return latest.key
            raise _unservable(latest)
        state = versions.get(ref.version)
        if state is None:
            raise not_found("unknown_adapter", f"adapter {ref.name!r} has no version {ref.version!r}; versions: {self.snapshot.available(ref.name)}")
        if state.state != AVAILABLE and not any_state:
            raise _unservable(state)
        return state.key


def _unservable(s: VersionState) -> DomainError:
    if s.state == RETIRED:
        return not_found("unknown_adapter", f"adapter {s.name!r} version {s.version!r} is {s.reason}")
    if s.state == INVALID:  # the bundle's own error, as a load of it would say
        return DomainError(Kind.CONFLICT, s.code or "bad_manifest", s.reason)
    return DomainError(Kind.CONFLICT, s.code or "missing_file", f"{s.key} is {s.state}: {s.reason}")


__all__ = ["AVAILABLE", "INCOMPLETE", "INVALID", "RETIRED", "Policy", "Repository", "Snapshot", "VersionState", "parse_policies"]
