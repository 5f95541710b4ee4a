"""The file manifest of a compressed model: every file's size and sha256, kept on its registry version.

The register step writes the manifest as the model-version tag ``langops.files`` when it creates the
version; the model server and the promotion gate check what they download against it, so a copy that
changed in the artifact store or in a local cache is never taken for the registered model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FILES_TAG = "langops.files"
MAX_TAG_CHARS = 5000
"""What every MLflow backend stores in a model-version tag value (MLflow's own SQL store takes 100,000;
the REST API only guarantees 5,000). A compressed model has a handful of files, far below it."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


Manifest = dict[str, FileEntry]  # posix path relative to the compressed dir -> its size and digest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(directory: Path) -> Manifest:
    """Size and sha256 of every file under ``directory``, by relative posix path."""
    root = Path(directory)
    return {
        file.relative_to(root).as_posix(): FileEntry(file.stat().st_size, file_sha256(file))
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }


def encode_manifest(manifest: Manifest) -> str:
    """Compact JSON ``{"path": [size, "sha256"]}``, sorted by path.

    Raises:
        ValueError: the encoding is longer than ``MAX_TAG_CHARS`` and could not be stored as a tag.
    """
    encoded = json.dumps(
        {path: [entry.size, entry.sha256] for path, entry in sorted(manifest.items())}, separators=(",", ":")
    )
    if len(encoded) > MAX_TAG_CHARS:
        raise ValueError(
            f"the file manifest of {len(manifest)} files takes {len(encoded)} characters; a model-version tag "
            f"holds at most {MAX_TAG_CHARS}"
        )
    return encoded


def decode_manifest(encoded: str) -> Manifest:
    """The manifest ``encode_manifest`` wrote.

    Raises:
        ValueError: the text is not such a manifest.
    """
    try:
        return {path: FileEntry(int(size), str(digest)) for path, (size, digest) in json.loads(encoded).items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a {FILES_TAG} manifest: {encoded[:200]!r}") from exc


def manifest_mismatches(directory: Path, expected: Manifest) -> list[str]:
    """How the files under ``directory`` differ from ``expected``: one line per file, empty when none do.

    Sizes are compared first, for every file; digests are computed only when all sizes match, so a
    truncated or replaced model is told apart without hashing hundreds of megabytes.
    """
    root = Path(directory)
    found = {file.relative_to(root).as_posix(): file for file in root.rglob("*") if file.is_file()}
    problems = [f"{path}: missing (expected {entry.size} bytes)" for path, entry in sorted(expected.items())
                if path not in found]
    problems += [f"{path}: not in the registered model" for path in sorted(set(found) - set(expected))]
    for path, entry in sorted(expected.items()):
        if path in found and (size := found[path].stat().st_size) != entry.size:
            problems.append(f"{path}: size {size} bytes, expected {entry.size}")
    if problems:
        return problems
    for path, entry in sorted(expected.items()):
        if (digest := file_sha256(found[path])) != entry.sha256:
            problems.append(f"{path}: sha256 {digest}, expected {entry.sha256}")
    return problems
