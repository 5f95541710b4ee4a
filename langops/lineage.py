"""Lineage identifiers: content hashes that match DVC's, and the git commit the code ran from.

``dvc_dir_md5`` reproduces DVC 3's directory hash so the ``data_version`` a step logs to MLflow is the
same string as the ``md5:`` DVC writes for that output; the two can be joined without running DVC.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    """Hex md5 of a file's bytes, as DVC 3 records it for files (``hash: md5``, no line-ending rewrite)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def dvc_dir_md5(path: Path) -> str:
    """DVC 3's hash of a directory output: ``<md5>.dir``.

    DVC (``dvc_data.hashfile.tree.Tree.digest``) hashes ``json.dumps(entries, sort_keys=True)`` where
    ``entries`` lists ``{"md5": <file md5>, "relpath": <posix path>}`` for every file, sorted by path.

    Raises:
        NotADirectoryError: ``path`` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    entries = sorted(
        (
            {"md5": file_md5(file), "relpath": file.relative_to(root).as_posix()}
            for file in root.rglob("*")
            if file.is_file()
        ),
        key=lambda entry: entry["relpath"],
    )
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob, usedforsecurity=False).hexdigest() + ".dir"


def git_commit(repo: Path) -> str | None:
    """HEAD of the repository holding ``repo``, suffixed ``-dirty`` when tracked files have changes.

    Untracked files do not count, as with ``git describe --dirty``. Returns None when ``repo`` is not in
    a git work tree (or it has no commit yet) or git is not installed: lineage is then unknown, not an error.
    """
    try:
        head = _git(repo, "rev-parse", "--verify", "HEAD")
        changes = _git(repo, "status", "--porcelain", "--untracked-files=no")
    except (FileNotFoundError, subprocess.CalledProcessError):
        return None
    return f"{head}-dirty" if changes else head


def _git(repo: Path, *args: str) -> str:
    completed = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, timeout=30
    )
    return completed.stdout.strip()
