"""Dependencies point one way: no import cycle in the package, and the low layers import no higher one.

Every import statement that runs counts, including those inside functions (a lazy import is
still a dependency); imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "quikft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        test = node.test if isinstance(node, ast.If) else None
        if test is not None and "TYPE_CHECKING" in ast.unparse(test):
            yield from (child for orelse in node.orelse for child in [orelse, *_runtime_nodes(orelse)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from quikft.x import y`: y may be a submodule (quikft.x.y) or a name in quikft.x
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                           else node.module for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def _within(name: str, packages: tuple[str, ...]) -> bool:
    """``name`` is one of ``packages`` or a module inside one (``quikft.quant`` holds ``quikft.quant.gptq``,
    not ``quikft.quantize``)."""
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def test_low_layers_import_no_higher_layer():
    graph = import_graph()
    assert graph["quikft.config"] == set(), "the config layer imports nothing from quikft"
    core = [name for name in graph if _within(name, ("quikft.quant", "quikft.packing"))]
    for name in core:
        training = sorted(t for t in graph[name] if t.startswith("quikft.recovery"))
        assert not training, f"{name} imports training code ({training[0]})"
    for name, targets in graph.items():
        assert "quikft.cli" not in targets, f"{name} imports the CLI"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_format_sits_below_the_quantizer_and_the_jobs():
    """quikft.format (the checkpoint contract) depends on the layer it stores (quikft.nn), never on
    what produces or consumes checkpoints; its names, headers and config checks need no model code."""
    graph = import_graph()
    fmt = [name for name in graph if name == "quikft.format" or name.startswith("quikft.format.")]
    above = ("quikft.quant", "quikft.quantize", "quikft.recovery", "quikft.hf", "quikft.jobs", "quikft.models",
             "quikft.eval", "quikft.integrations", "quikft.cli", "quikft.checkpoint")
    for name in fmt:
        reached = sorted(t for t in _reachable(graph, name) if t.startswith(above))
        assert not reached, f"{name} imports {reached[0]}"
    for name in ("quikft.format.layout", "quikft.format.protocol", "quikft.format.header", "quikft.format.reader"):
        model_code = sorted(t for t in _reachable(graph, name) if t.startswith(("quikft.nn", "quikft.arch")))
        assert not model_code, f"{name} imports {model_code[0]}"
    for name, targets in graph.items():
        if name.startswith(("quikft.nn", "quikft.arch")):
            assert not {t for t in targets if t.startswith("quikft.format")}, f"{name} imports the format"
        # quikft.checkpoint is a compatibility shim for users: the package itself imports the format.
        assert name == "quikft.checkpoint" or "quikft.checkpoint" not in targets, f"{name} imports quikft.checkpoint"


def test_only_the_format_spells_checkpoint_file_names():
    """File names of a checkpoint directory live in quikft.format.layout; others use its constants."""
    names = ('"model.safetensors', "index.json", '"model-', "salient_indices.safetensors")
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "format":
            continue
        spelled = [name for name in names if name in path.read_text()]
        assert not spelled, f"{path.relative_to(PACKAGE)} spells {spelled[0]}"


def test_recovery_sits_above_the_layers_it_trains():
    """quikft.recovery (GIFT layers, losses, sharding, the job) uses the quantizer, the format, the inference
    layers and the integrations; none of them, nor any other library layer, imports it. Only the CLI, the
    reports (recovery modes name their rows) and the recovery package itself do."""
    graph = import_graph()
    users = {"quikft.cli", "quikft.eval.report"}
    for name, targets in graph.items():
        if name.startswith("quikft.recovery") or name in users:
            continue
        reached = sorted(t for t in targets if t.startswith("quikft.recovery"))
        assert not reached, f"{name} imports {reached[0]}"


def test_quant_is_math_and_the_block_loop_below_the_format():
    """quikft.quant (grids, GPTQ/RTN, saliency, statistics, the --target-bpw math and the block loop) sits
    below the format it feeds: it reaches the settings, the architecture adapter and the bit counts, never
    a checkpoint format, a kernel, an evaluation, a job or training code."""
    graph = import_graph()
    below = ("quikft.quant", "quikft.config", "quikft.arch", "quikft.bits", "quikft.packing", "quikft.hardware")
    for name in graph:
        if _within(name, ("quikft.quant",)):
            reached = sorted(t for t in _reachable(graph, name) if not _within(t, below))
            assert not reached, f"{name} imports {reached[0]}"


def test_only_the_cli_runs_jobs():
    """quikft.jobs (what the commands run: the quantize job and its streaming machinery) sits with the
    recovery and the integrations below the CLI and above quant, format and nn: nothing but the CLI (and
    the public re-export quikft.quantize) imports it."""
    graph = import_graph()
    for name, targets in graph.items():
        if not _within(name, ("quikft.jobs", "quikft.cli", "quikft.quantize")):
            jobs = sorted(t for t in targets if _within(t, ("quikft.jobs",)))
            assert not jobs, f"{name} imports {jobs[0]}"
    assert graph["quikft.quantize"] <= {"quikft.jobs.quantize"}, "quikft.quantize is only a re-export"
