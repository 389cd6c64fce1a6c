"""The dashboard's files, built once at start-up for caching that is both fast and correct.

Every asset gets a fingerprinted name from its content (app.js -> app.3f2a1c9e.js), so
it can be cached for a year; pages refer to assets by their plain /static/ names and
are rewritten to the fingerprinted ones; each file gets .gz and .br siblings, which
aiohttp's FileResponse serves to clients that accept them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import brotli

PAGES = (".html",)
COMPRESSIBLE = (".html", ".js", ".css", ".svg", ".json", ".txt", ".map")
MIN_COMPRESS = 256  # bytes; smaller files are not worth a sibling


@dataclass(frozen=True)
class StaticFiles:
    """Where the built files are, and which public names map to which file."""

    root: Path
    fingerprinted: dict[str, str] = field(default_factory=dict)  # app.3f2a1c9e.js -> file name in root
    plain: dict[str, str] = field(default_factory=dict)  # app.js (and pages) -> file name in root

    def lookup(self, name: str) -> tuple[Path, bool] | None:
        """The file for a public name and whether it is fingerprinted (immutable), or None."""
        if name in self.fingerprinted:
            return self.root / self.fingerprinted[name], True
        if name in self.plain:
            return self.root / self.plain[name], False
        return None


def fingerprint(name: str, content: bytes) -> str:
    stem, dot, ext = name.rpartition(".")
    digest = hashlib.sha256(content).hexdigest()[:8]
    return f"{stem}.{digest}.{ext}" if dot else f"{name}.{digest}"


def source_files(source: Path) -> list[Path]:
    """Visible regular files directly in source (no dotfiles, no subdirectories, no links)."""
    return sorted(p for p in source.iterdir() if not p.name.startswith(".") and p.is_file() and not p.is_symlink())


def build_static(source: Path, dest: Path) -> StaticFiles:
    """Copy source's files into dest under fingerprinted names, rewrite pages, add .gz/.br."""
    dest.mkdir(parents=True, exist_ok=True)
    assets = {p.name: p.read_bytes() for p in source_files(source) if p.suffix not in PAGES}
    pages = {p.name: p.read_bytes() for p in source_files(source) if p.suffix in PAGES}
    files = StaticFiles(dest.resolve())
    for name, content in assets.items():
        public = fingerprint(name, content)
        _write(dest / public, content)
        files.fingerprinted[public] = public
        files.plain[name] = public
    for name, content in pages.items():
        for asset, public in files.plain.items():
            content = content.replace(f"/static/{asset}".encode(), f"/static/{public}".encode())
        built = fingerprint(name, content)  # built under a content name, served under the plain one
        _write(dest / built, content)
        files.plain[name] = built
    return files


def _write(path: Path, content: bytes) -> None:
    """Write once (names are content hashes), atomically, with compressed siblings."""
    variants = {path: content}
    if path.suffix in COMPRESSIBLE and len(content) >= MIN_COMPRESS:
        variants[path.with_name(path.name + ".gz")] = gzip.compress(content, compresslevel=9, mtime=0)
        variants[path.with_name(path.name + ".br")] = brotli.compress(content)
    for target, data in variants.items():
        if target.exists():
            continue
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
