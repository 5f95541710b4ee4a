"""The pipeline, declared once: each stage's adapter, the params it reads, what it reads and what it writes.

From this table come:

- the step commands of the CLI (``langops prepare`` ... ``langops deploy-model``);
- ``dvc.yaml``: ``langops dvc-yaml`` writes it, and a test fails, naming the difference, when the
  committed file and the table disagree;
- the Prefect flow's tasks (``flows/pipeline.py``) and their cache keys (``langops.stage_cache``: the
  declared params, inputs and code of a stage, hashed);
- the summaries DVC reads as metrics and plots.

A stage's adapter (``langops.pipeline``) takes ``Params`` and the results of the stages in ``needs``. The
flow hands it those results; ``run_stage`` (a stage run on its own, as ``dvc repro`` runs it) loads them
from the outputs the earlier stages left, through each stage's ``load``.

Adding a step: write ``tasks/<step>.py`` (a function of its config section, the results it needs and
``out_dir``, returning a frozen result with a ``load(out_dir)``), add its config section and output folder
to ``langops.config`` and ``params.yaml``, and one ``Stage`` row here naming the function; then run
``langops dvc-yaml``. The flow runs the stages in this order.
"""

from __future__ import annotations

import functools
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from langops.config import Params
from langops.tasks import baseline, compress, evaluate, prepare, register, validate

RAW_DATA = "data/raw"  # where dvc.yaml looks for the dataset (data.source may name files anywhere)


@dataclass(frozen=True)
class Output:
    """A folder named by a ``paths`` entry, or one file in it, that a stage writes and others may read."""

    folder: str  # a field of ``PathsConfig``
    file: str | None = None
    kind: Literal["out", "metrics", "plots"] = "out"
    cache: bool = True  # DVC caches it; small reports are rewritten every run and kept in git instead
    persist: bool = False
    plot: dict[str, str] = field(default_factory=dict)  # DVC plot properties (template, x, y)

    @property
    def dvc_path(self) -> str:
        return f"${{paths.{self.folder}}}" + (f"/{self.file}" if self.file else "")

    def path(self, params: Params) -> Path:
        folder = getattr(params.paths, self.folder)
        return folder / self.file if self.file else folder


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline, as every runner of it (CLI, DVC, Prefect) needs to know it.

    A stage either names its step (``step``: ``module:function``, called with its ``config`` section of
    params, the results of ``needs`` as keywords and ``out_dir``, the folder of its first output) or an
    adapter of ``langops.pipeline`` that does more around the step (tracking, the registry, a server).
    """

    name: str
    params: tuple[str, ...]  # dotted params keys the stage reads (DVC `params:`, cache key)
    deps: tuple[Output | str, ...]  # outputs of earlier stages it reads; a str is a repository path
    outs: tuple[Output, ...]
    code: tuple[str, ...]  # modules whose source is the stage's code
    step: str | None = None  # ``module:function`` of a step called as it is (no adapter)
    config: str | None = None  # the params section the step takes (with ``step``)
    adapter_name: str | None = None  # otherwise its adapter in ``langops.pipeline``: run(params, **results)
    after: tuple[Output, ...] = ()  # outputs it must run after without reading them (DVC deps, not inputs)
    needs: tuple[str, ...] = ()  # earlier stages whose results it takes, by their `result` name
    result: str | None = None  # what later stages call this stage's result (``prepared``, ``trained`` ...)
    loader_name: str | None = None  # in ``langops.pipeline``: load(params) -> this stage's result, from its outputs
    command: str | None = None  # the CLI command, when it is not the stage's name
    cached: bool = False  # the flow reuses its result while its inputs and outputs are unchanged
    retried: bool = False  # the flow retries it on transient I/O and registry failures
    uses_tracking: bool = False  # the MLflow store is one of its inputs

    def __post_init__(self) -> None:
        if (self.step is None) == (self.adapter_name is None):
            raise TypeError(f"stage {self.name!r} names either a step (with its config) or an adapter")
        if self.step is not None and (self.config is None or not self.outs):
            raise TypeError(f"stage {self.name!r}: a step needs its config section and an output folder")

    @property
    def cli_command(self) -> str:
        return self.command or self.name

    @property
    def adapter(self) -> Callable[..., Any]:
        """``adapter(params, **results of needs)``: what every runner calls to run this stage."""
        if self.adapter_name is not None:
            return getattr(_adapters(), self.adapter_name)
        return functools.partial(_call_step, self)

    def load(self, params: Params) -> Any:
        """This stage's result, rebuilt from the outputs it left (for a later stage run on its own)."""
        if self.loader_name is not None:
            return getattr(_adapters(), self.loader_name)(params)
        if self.step is not None:  # a step's result type rebuilds itself from its output folder
            result_type = typing.get_type_hints(_step_function(self))["return"]
            return result_type.load(getattr(params.paths, self.outs[0].folder))
        raise TypeError(f"stage {self.name!r} declares no result to load")

    def output(self, folder: str, file: str | None = None) -> Output:
        return next(o for o in self.outs if o.folder == folder and o.file == file)


def _step_function(current: Stage) -> Callable[..., Any]:
    module, _, function = (current.step or "").partition(":")
    return getattr(importlib.import_module(module), function)


def _call_step(current: Stage, params: Params, **results: Any) -> Any:
    """Run a stage that names its step: its config section, the results it needs, its output folder."""
    section = getattr(params, current.config or "")
    return _step_function(current)(section, **results, out_dir=getattr(params.paths, current.outs[0].folder))


# Kept in place while `dvc repro` runs prepare, which compares the new version's splits with it.
PREPARED = Output("prepared", persist=True)
SPLIT_CHANGES = Output("prepare_report", prepare.SPLIT_CHANGES_FILE, kind="metrics", cache=False)
VALIDATION_REPORT = Output("validation", validate.REPORT_FILE, cache=False)
VALIDATION_SUMMARY = Output("validation", validate.SUMMARY_FILE, kind="metrics", cache=False)
BASELINE_SUMMARY = Output("baseline", baseline.SUMMARY_FILE)
BASELINE_TEST_PREDICTIONS = Output("baseline", baseline.TEST_PREDICTIONS)
BASELINE_VALIDATION_PREDICTIONS = Output("baseline", baseline.VALIDATION_PREDICTIONS)
BASELINE_METRICS = Output("baseline", baseline.METRICS_FILE, kind="metrics", cache=False)
TRAINED = Output("trained")
CHECKPOINTS = Output("checkpoints", cache=False, persist=True)
EVALUATION_PREDICTIONS = Output("evaluation", evaluate.PREDICTIONS_CSV, cache=False)
EVALUATION_PNG = Output("evaluation", evaluate.CONFUSION_PNG, cache=False)
RELIABILITY_PNG = Output("evaluation", evaluate.RELIABILITY_PNG, cache=False)
EVALUATION_DETAILS = Output("evaluation", evaluate.DETAILS_FILE, cache=False)
EVALUATION_METRICS = Output("evaluation", evaluate.METRICS_FILE, kind="metrics", cache=False)
EVALUATION_CONFUSION = Output(
    "evaluation", evaluate.CONFUSION_CSV, kind="plots", cache=False,
    plot={"template": "confusion", "x": "actual", "y": "predicted"},
)
STUDENT = Output("student")
COMPRESSED = Output("compressed")
COMPRESSION_METRICS = Output("compression", compress.METRICS_FILE, kind="metrics", cache=False)
REGISTRATION = Output("registration", register.SUMMARY_FILE, cache=False)
PROMOTION = Output("promotion", cache=False)
DEPLOYMENT = Output("deployment", cache=False)
DVC_IMAGE_PLOTS = (EVALUATION_PNG, RELIABILITY_PNG)  # shown by `dvc plots show` as they are

STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare", adapter_name="run_prepare",
        params=("project.seed", "data", "prepare"),
        deps=(RAW_DATA,),
        outs=(PREPARED, SPLIT_CHANGES),
        code=("langops.tasks.prepare", "langops.demo_data"),
        result="prepared", loader_name="load_prepared",
        cached=True, retried=True,
    ),
    Stage(
        "validate", adapter_name="run_validate",
        params=("data", "validate"),
        deps=(PREPARED,),
        outs=(VALIDATION_REPORT, VALIDATION_SUMMARY),
        code=("langops.tasks.validate",),
        needs=("prepare",),
        result="validated", loader_name="load_validated",
        cached=True,
    ),
    Stage(
        "baseline", adapter_name="run_baseline",
        params=("baseline",),
        deps=(PREPARED,),
        after=(VALIDATION_SUMMARY,),  # never fit on data that failed validation; its report is no input
        outs=(BASELINE_SUMMARY, BASELINE_TEST_PREDICTIONS, BASELINE_VALIDATION_PREDICTIONS, BASELINE_METRICS),
        code=("langops.tasks.baseline",),
        needs=("prepare",),
        result="baseline", loader_name="load_baseline",
        cached=True,
    ),
    Stage(
        "train", adapter_name="run_train",
        params=("project.seed", "train"),
        deps=(PREPARED,),
        after=(VALIDATION_SUMMARY,),  # never train on data that failed validation; its report is no input
        outs=(TRAINED, CHECKPOINTS),
        code=("langops.tasks.train",),
        needs=("prepare",),
        result="trained", loader_name="load_trained",
        cached=True, uses_tracking=True,
    ),
    Stage(
        "evaluate", adapter_name="run_evaluate",
        params=("evaluate",),
        deps=(PREPARED, TRAINED, BASELINE_SUMMARY, BASELINE_TEST_PREDICTIONS),
        outs=(EVALUATION_PREDICTIONS, EVALUATION_PNG, RELIABILITY_PNG, EVALUATION_DETAILS, EVALUATION_METRICS,
              EVALUATION_CONFUSION),
        code=("langops.tasks.evaluate",),
        needs=("prepare", "baseline", "train"),
        result="evaluated", loader_name="load_evaluated",
        cached=True,
    ),
    Stage(
        "distill", adapter_name="run_distill",
        params=("project.seed", "compress.distill", "promote.thresholds", "promote.confidence",
                "promote.bootstrap_samples"),
        deps=(PREPARED, TRAINED, BASELINE_SUMMARY, BASELINE_VALIDATION_PREDICTIONS),
        outs=(STUDENT,),
        code=("langops.tasks.distill",),
        needs=("prepare", "baseline", "train"),
        result="distilled", loader_name="load_distilled",
        cached=True, uses_tracking=True,
    ),
    Stage(
        "compress", adapter_name="run_compress",
        params=("compress",),
        deps=(PREPARED, TRAINED, STUDENT),
        outs=(COMPRESSED, COMPRESSION_METRICS),
        code=("langops.tasks.compress",),
        needs=("prepare", "train", "distill"),
        result="compressed", loader_name="load_compressed",
        cached=True,
    ),
    Stage(
        "register", adapter_name="run_register",
        params=("register", "tracking"),
        deps=(COMPRESSED, TRAINED, STUDENT),
        outs=(REGISTRATION,),
        code=("langops.tasks.register",),
        needs=("train", "distill", "compress"),
        result="registered", loader_name="load_registered",
        cached=True, retried=True, uses_tracking=True,
    ),
    Stage(
        "promote", adapter_name="run_promote",
        params=("promote", "deploy.rollout", "register.model_name", "tracking"),
        deps=(REGISTRATION, BASELINE_SUMMARY, BASELINE_TEST_PREDICTIONS),
        outs=(PROMOTION,),
        code=("langops.tasks.promote",),
        needs=("prepare", "baseline", "compress", "register"),
    ),
    Stage(
        "deploy", adapter_name="run_deploy",
        params=("deploy", "register.model_name", "tracking"),
        deps=(),
        after=(PROMOTION,),  # it serves whatever the registry's champion is, once the gate has spoken
        outs=(DEPLOYMENT,),
        code=("langops.tasks.deploy",),
        command="deploy-model",
        retried=True,
    ),
)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
        KeyError: no such stage (the message lists them).
    """
    if name not in BY_NAME:
        raise KeyError(f"no stage {name!r}; the stages are {list(BY_NAME)}")
    return BY_NAME[name]


def run_stage(name: str, params: Params, **options: Any) -> Any:
    """Run one stage on its own: the results it needs are loaded from what earlier stages left on disk.

    ``options`` go to the adapter as keywords (``force_reason`` and ``actor`` for promote).
    """
    current = stage(name)
    inputs = {}
    for need in current.needs:
        upstream = stage(need)
        if upstream.result is None:
            raise TypeError(f"stage {need!r} is needed by {name!r} but declares no result name")
        inputs[upstream.result] = upstream.load(params)
    return current.adapter(params, **inputs, **options)


def _adapters() -> ModuleType:
    """``langops.pipeline``, imported on first use: the adapters import torch, transformers and MLflow, and
    the CLI reads this table to build its parser, so a command like ``langops status`` must not pay for them."""
    return importlib.import_module("langops.pipeline")


# -------------------------------------------------------------------------------------------- dvc.yaml


def code_file(module: str) -> str:
    """The repository path of a langops module (``langops.tasks.train`` is ``tasks/train.py``)."""
    parts = module.split(".")
    if parts[0] != "langops":
        raise ValueError(f"{module!r} is not a langops module")
    if len(parts) > 2 and parts[1] in ("tasks", "flows"):
        return "/".join(parts[1:]) + ".py"
    return "/".join(parts) + ".py"


def dvc_yaml() -> dict[str, Any]:
    """``dvc.yaml`` as the table declares it: one stage per step, paths interpolated from params."""
    stages: dict[str, Any] = {}
    for current in STAGES:
        deps = [d if isinstance(d, str) else d.dvc_path for d in (*current.deps, *current.after)]
        deps += [code_file(m) for m in current.code]
        entry: dict[str, Any] = {"cmd": f"langops {current.cli_command}", "deps": deps, "params": list(current.params)}
        for kind in ("out", "metrics", "plots"):
            declared = [_dvc_output(o) for o in current.outs if o.kind == kind]
            if declared:
                entry["outs" if kind == "out" else kind] = declared
        stages[current.name] = entry
    return {"stages": stages, "plots": [o.dvc_path for o in DVC_IMAGE_PLOTS]}


def _dvc_output(output: Output) -> str | dict[str, Any]:
    flags: dict[str, Any] = {}
    if not output.cache:
        flags["cache"] = False
    if output.persist:
        flags["persist"] = True
    flags.update(output.plot)
    return {output.dvc_path: flags} if flags else output.dvc_path


DVC_HEADER = (
    "# Written by `langops dvc-yaml` from the stage table (langops/stages.py); edit the table, not this file.\n"
    "# The same steps as the Prefect flow (flows/pipeline.py), one stage each; paths come from params.yaml.\n"
)


def render_dvc_yaml() -> str:
    import yaml

    return DVC_HEADER + yaml.safe_dump(dvc_yaml(), sort_keys=False, width=120)
