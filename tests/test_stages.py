"""The stage table is the one declaration of the pipeline: dvc.yaml, the CLI and the flow come from it, and
the steps stay plain functions that import no orchestration."""

from __future__ import annotations

import ast
import difflib
import re
from pathlib import Path

import pytest
import yaml

from langops.cli import _parser
from langops.config import Params
from langops.stages import STAGES, Output, code_file, render_dvc_yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
# Steps whose job is the registry may use MLflow; each is named for that job.
REGISTRY_STEPS = {"register.py"}
ORCHESTRATION = ("langops.pipeline", "langops.promotions", "langops.stages", "langops.flows", "prefect", "mlflow")


def test_dvc_yaml_is_the_stage_table():
    committed = (REPO / "dvc.yaml").read_text()
    rendered = render_dvc_yaml()
    difference = "".join(difflib.unified_diff(
        committed.splitlines(keepends=True), rendered.splitlines(keepends=True), "dvc.yaml", "the stage table"
    ))
    assert committed == rendered, f"dvc.yaml differs from langops/stages.py; run `langops dvc-yaml`:\n{difference}"


def test_every_stage_reads_params_that_exist_and_code_that_is_there():
    fields = Params.model_fields
    for stage in STAGES:
        for key in stage.params:
            section, _, rest = key.partition(".")
            assert section in fields, (stage.name, key)
            if rest:
                assert rest.split(".")[0] in fields[section].annotation.model_fields, (stage.name, key)
        for module in stage.code:
            assert (REPO / code_file(module)).is_file(), (stage.name, module)
        for need in stage.needs:
            upstream = next(s for s in STAGES if s.name == need)
            assert STAGES.index(upstream) < STAGES.index(stage) and upstream.result, (stage.name, need)
            assert callable(upstream.load)


def test_every_stage_is_a_command_and_a_dvc_stage():
    commands = set(_parser()._subparsers._group_actions[0].choices)
    dvc_stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        assert stage.cli_command in commands
        assert dvc_stages[stage.name]["cmd"] == f"langops {stage.cli_command}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_steps_import_no_orchestration_and_only_registry_steps_import_mlflow():
    for path in sorted((REPO / "tasks").glob("*.py")):
        for name in _imports(path):
            if path.name in REGISTRY_STEPS and name.split(".")[0] == "mlflow":
                continue
            assert not name.startswith(ORCHESTRATION), f"tasks/{path.name} imports {name}"


def test_no_step_output_is_named_outside_the_step_that_writes_it():
    """A file a stage writes is named by its step's constant; elsewhere code takes it from the step or the
    stage table, so no literal copy of the name can drift."""
    outputs = {o.file for stage in STAGES for o in stage.outs if isinstance(o, Output) and o.file}
    sources = [*(REPO / "langops").rglob("*.py"), *(REPO / "flows").glob("*.py"), *(REPO / "tasks").glob("*.py")]
    for name in sorted(outputs):
        literal = re.compile(rf"[\"']{re.escape(name)}[\"']")
        writers = {path.relative_to(REPO).as_posix() for path in sources if literal.search(path.read_text())}
        # several steps may each write a file of that name (metrics.json) into their own folder
        steps = {code_file(module) for stage in STAGES if any(o.file == name for o in stage.outs)
                 for module in stage.code}
        assert writers <= steps, (name, sorted(writers - steps))


def _first_party_imports() -> dict[str, set[str]]:
    """Each langops module and the langops modules it imports, at the top or inside a function."""
    files = {"langops." + ".".join(p.relative_to(REPO / "langops").with_suffix("").parts): p
             for p in (REPO / "langops").rglob("*.py")}
    files |= {f"langops.{folder}.{p.stem}": p for folder in ("tasks", "flows") for p in (REPO / folder).glob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in files.items()}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {owner(f"{node.module}.{alias.name}") or owner(node.module) for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {owner(alias.name) for alias in node.names}
        graph[name] = {m for m in imported if m and m != name and m.startswith("langops")}
    return graph


def test_imports_go_one_way_even_inside_functions():
    """A function-local import may defer a heavy library; it may not hide a cycle between modules."""
    graph = _first_party_imports()
    assert {"langops.tasks.train", "langops.flows.pipeline", "langops.stages"} <= set(graph)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module):], module]))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])


@pytest.mark.parametrize(("benchmark", "steps"), [("serving.py", "BUILD_STEPS"), ("pipeline_sst2.py", "STEPS")])
def test_benchmarks_build_their_models_stage_by_stage_in_the_pipeline_order(benchmark, steps):
    """They run each named stage with ``run_stage``; a stage renamed, added or reordered must show here, not
    when someone next runs a benchmark that takes minutes to reach the failing step."""
    tree = ast.parse((REPO / "benchmarks" / benchmark).read_text())
    (named,) = [ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and [getattr(target, "id", None) for target in node.targets] == [steps]]
    order = [stage.name for stage in STAGES]
    assert named == tuple(name for name in order if name in named), f"{steps} is not in the pipeline's order"
    assert set(named) >= set(order[: order.index("register")]) - {"deploy"}, "a stage the model needs is missing"
