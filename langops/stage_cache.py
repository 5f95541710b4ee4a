"""What the Prefect flow caches its steps by: input fingerprints, and stamps of the outputs they left.

A step's key hashes what ``dvc.yaml`` declares for the same stage: the params it reads, the content of the
data and models it reads, and its code (plus the MLflow store for steps that write to it). Reusing a
cached result also needs the step's outputs to be on disk as the cached run left them: each run leaves a
stamp (sizes and mtimes of its output files, like DVC's state), and a missing or rewritten output (deleted
by hand, overwritten by ``dvc repro`` with other params) means the step runs again. The registration's
stamp also needs its model version to still exist in the registry.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langops.config import Params
from langops.io import read_json, write_json
from langops.lineage import dvc_dir_md5, file_md5


@dataclass(frozen=True)
class StageSpec:
    """One cached step: dotted params it reads, ``paths`` fields it reads and writes, its code modules."""

    params: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    code: tuple[str, ...]
    uses_tracking: bool = False


# Mirrors the params/deps/outs of the stages in dvc.yaml (tests/test_stage_cache.py keeps the two in step).
# "data.source" stands for the dataset's files themselves (one file, or the user's split files).
STAGES: dict[str, StageSpec] = {
    "prepare": StageSpec(
        params=("project.seed", "data", "prepare"),
        inputs=("data.source",),
        outputs=("prepared",),
        code=("langops.tasks.prepare", "langops.demo_data"),
    ),
    "validate": StageSpec(
        params=("data", "validate"), inputs=("prepared",), outputs=("validation",), code=("langops.tasks.validate",)
    ),
    "train": StageSpec(
        params=("project.seed", "train"),
        inputs=("prepared",),
        outputs=("trained",),
        code=("langops.tasks.train",),
        uses_tracking=True,
    ),
    "evaluate": StageSpec(
        params=("evaluate", "train.max_length"),
        inputs=("prepared", "trained"),
        outputs=("evaluation",),
        code=("langops.tasks.evaluate",),
    ),
    "compress": StageSpec(
        params=("compress", "train.max_length"),
        inputs=("prepared", "trained"),
        outputs=("compressed", "compression"),
        code=("langops.tasks.compress",),
    ),
    "register": StageSpec(
        params=("register", "tracking"),
        inputs=("compressed", "trained"),
        outputs=("registration",),
        code=("langops.tasks.register",),
        uses_tracking=True,
    ),
}

STAMP_DIR = "stage-cache"

# Content hashes are memoised by the file's size and mtime, so a flow that reads the trained model in
# three keys hashes its bytes once.
_content_hashes: dict[tuple[str, tuple[Any, ...]], str] = {}


def stage_key(stage: str, params: Params) -> str:
    """The cache key of ``stage`` for these params and the current content of its inputs.

    Raises:
        KeyError: ``stage`` is not a cached step.
        FileNotFoundError: an input the step reads does not exist yet.
    """
    spec = STAGES[stage]
    dumped = params.model_dump(mode="json")
    material = {
        "stage": stage,
        "params": {name: _dotted(dumped, name) for name in spec.params},
        "inputs": {name: _input_md5(params, name) for name in spec.inputs},
        "code": {module: file_md5(Path(importlib.import_module(module).__file__ or "")) for module in spec.code},
    }
    if spec.uses_tracking:
        material["tracking_store"] = tracking_store(params)
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return f"langops-{stage}-{hashlib.sha256(blob).hexdigest()[:32]}"


def tracking_store(params: Params) -> str:
    """Which MLflow store the runs go to: the URI, except that the MLflow server of ``langops up`` counts
    as the project's own SQLite store, which it serves, so starting the services keeps the cache warm."""
    from langops.services import read_endpoints

    uri = params.tracking_uri()
    endpoints = read_endpoints(params.project.state_dir)
    if endpoints is not None and uri == endpoints.mlflow_tracking_uri:
        return params.embedded_tracking_uri()
    return uri


def outputs_intact(stage: str, params: Params, key: str, *, still_exists: Callable[[str], bool] | None = None) -> bool:
    """Whether the outputs the run with ``key`` left are still there, unchanged since it finished.

    ``still_exists(version)`` checks a registration's model version in the registry (for ``register``).
    """
    stamp_path = _stamp_path(params, stage)
    if not stamp_path.is_file():
        return False
    stamp = read_json(stamp_path)
    if stamp.get("key") != key or stamp.get("outputs") != _output_signatures(params, STAGES[stage]):
        return False
    if stage == "register" and still_exists is not None:
        registration = read_json(params.paths.registration / "registration.json")
        return still_exists(str(registration["version"]))
    return True


def write_stamp(stage: str, params: Params, key: str) -> None:
    """Record that the outputs on disk now are what the run with ``key`` produced."""
    write_json(_stamp_path(params, stage), {"key": key, "outputs": _output_signatures(params, STAGES[stage])})


def _stamp_path(params: Params, stage: str) -> Path:
    return params.project.state_dir / STAMP_DIR / f"{stage}.json"


def _input_md5(params: Params, name: str) -> str | dict[str, str]:
    """The content hash of an input; the demo generator stands for itself.

    Raises:
        PrepareError: a dataset file named by ``data.source`` is missing or of an unknown format.
    """
    if name == "data.source":
        from langops.tasks.prepare import source_files

        files = source_files(params.data)
        return {split: _content_md5(path) for split, path in files.items()} if files else "demo"
    return _content_md5(getattr(params.paths, name))


def _content_md5(path: Path) -> str:
    """DVC-style md5 of a file or folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the step that writes it has not run")
    signature = (str(path.resolve()), tuple(_signatures(path)))
    if signature not in _content_hashes:
        _content_hashes[signature] = dvc_dir_md5(path) if path.is_dir() else file_md5(path)
    return _content_hashes[signature]


def _output_signatures(params: Params, spec: StageSpec) -> dict[str, list[list[Any]]]:
    return {name: [list(entry) for entry in _signatures(getattr(params.paths, name))] for name in spec.outputs}


def _signatures(path: Path) -> list[tuple[str, int, int]]:
    """(relative path, size, mtime in ns) of every file under ``path``; empty when it does not exist."""
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return []
    files = sorted(file for file in path.rglob("*") if file.is_file())
    return [(file.relative_to(path).as_posix(), (s := file.stat()).st_size, s.st_mtime_ns) for file in files]


def _dotted(tree: dict[str, Any], name: str) -> Any:
    value: Any = tree
    for part in name.split("."):
        value = value[part]
    return value
