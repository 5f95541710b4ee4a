"""What the Prefect flow caches its steps by: input fingerprints, and stamps of the outputs they left.

A step's key hashes what its row of the stage table (``langops.stages``, which ``dvc.yaml`` is written
from) declares: the params it reads, the content of the data and models it reads, and its code (plus the
MLflow store for steps that write to it). Reusing a
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
from pathlib import Path
from typing import Any

from langops.config import Params
from langops.io import read_json, write_json
from langops.lineage import dvc_dir_md5, file_md5
from langops.services import read_endpoints
from langops.stages import RAW_DATA, Output, Stage
from langops.tasks.prepare import source_files

STAMP_DIR = "stage-cache"

# Content hashes are memoised by the file's size and mtime, so a flow that reads the trained model in
# three keys hashes its bytes once.
_content_hashes: dict[tuple[str, tuple[Any, ...]], str] = {}


def stage_key(stage: Stage, params: Params) -> str:
    """The cache key of ``stage`` for these params and the current content of its inputs.

    Raises:
        FileNotFoundError: an input the step reads does not exist yet.
        PrepareError: a dataset file named by ``data.source`` is missing or of an unknown format.
    """
    dumped = params.model_dump(mode="json")
    material = {
        "stage": stage.name,
        "params": {name: _dotted(dumped, name) for name in stage.params},
        "inputs": {_input_name(dep): _input_md5(params, dep) for dep in stage.deps},
        "code": {module: file_md5(Path(importlib.import_module(module).__file__ or "")) for module in stage.code},
    }
    if stage.uses_tracking:
        material["tracking_store"] = tracking_store(params)
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return f"langops-{stage.name}-{hashlib.sha256(blob).hexdigest()[:32]}"


def tracking_store(params: Params) -> str:
    """Which MLflow store the runs go to: the URI, except that the MLflow server of ``langops up`` counts
    as the project's own SQLite store, which it serves, so starting the services keeps the cache warm."""
    uri = params.tracking_uri()
    endpoints = read_endpoints(params.project.state_dir)
    if endpoints is not None and uri == endpoints.mlflow_tracking_uri:
        return params.embedded_tracking_uri()
    return uri


def outputs_intact(stage: Stage, params: Params, key: str, *, still_valid: Callable[[], bool] | None = None) -> bool:
    """Whether the outputs the run with ``key`` left are still there, unchanged since it finished.

    ``still_valid()`` checks what files cannot show, e.g. that a registration's version is still in the
    registry.
    """
    stamp_path = _stamp_path(params, stage)
    if not stamp_path.is_file():
        return False
    stamp = read_json(stamp_path)
    if stamp.get("key") != key or stamp.get("outputs") != _output_signatures(params, stage):
        return False
    return still_valid() if still_valid is not None else True


def write_stamp(stage: Stage, params: Params, key: str) -> None:
    """Record that the outputs on disk now are what the run with ``key`` produced."""
    write_json(_stamp_path(params, stage), {"key": key, "outputs": _output_signatures(params, stage)})


def _stamp_path(params: Params, stage: Stage) -> Path:
    return params.project.state_dir / STAMP_DIR / f"{stage.name}.json"


def _input_name(dep: Output | str) -> str:
    return dep if isinstance(dep, str) else dep.dvc_path


def _input_md5(params: Params, dep: Output | str) -> str | dict[str, str]:
    """The content hash of an input; the raw-data folder stands for ``data.source``'s files (the demo
    generator for itself) and the ``data.extra_sources`` there so far.

    Raises:
        PrepareError: a dataset file named by ``data.source`` is missing or of an unknown format.
    """
    if dep == RAW_DATA:
        hashes = {split: _content_md5(path) for split, path in source_files(params.data).items()}
        hashes |= {f"extra:{name}": _content_md5(Path(name)) for name in params.data.extra_sources if Path(name).exists()}
        return hashes or "demo"
    if isinstance(dep, str):
        return _content_md5(Path(dep))
    return _content_md5(dep.path(params))


def _content_md5(path: Path) -> str:
    """DVC-style md5 of a file or folder."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the step that writes it has not run")
    signature = (str(path.resolve()), tuple(_signatures(path)))
    if signature not in _content_hashes:
        _content_hashes[signature] = dvc_dir_md5(path) if path.is_dir() else file_md5(path)
    return _content_hashes[signature]


def _output_signatures(params: Params, stage: Stage) -> dict[str, list[list[Any]]]:
    """Every file the stage declares it writes, but persisted ones (checkpoints) that later runs reuse."""
    return {
        output.dvc_path: [list(entry) for entry in _signatures(output.path(params))]
        for output in stage.outs
        if not output.persist
    }


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
