"""Dependencies point one way: no import cycle in the package, and no import runs up the floors below.

Every import statement that runs counts, including those inside functions (a lazy import is
still a dependency); imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

import ast
import re
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


# Floors, lowest first. A module may import modules on its own floor or below it, never above: the
# quantization math knows no checkpoint, the checkpoint contract no layer, the layers no job, and
# nothing but the CLI knows the CLI. The format's contract (names, headers, config checks, weights
# files) sits below the layers; its writer, loader and ``info`` build QuikLinear layers, so they sit
# above them, with the other code that handles whole packed models.
CORE, FORMAT, NN, MODELS, EVAL, JOBS, CLI = range(7)
FLOOR_NAMES = ("core", "format", "nn", "models", "eval", "jobs", "cli")

# Module or package prefix -> floor; the longest prefix that names a module decides. A new module
# needs an entry (or a package's); a move keeps its floor by moving its entry.
FLOORS = {
    # settings, quantization math and the helpers everything uses
    "quikft.config": CORE,
    "quikft.quant": CORE,  # the math, saliency, statistics and the one block loop (no job, no format)
    "quikft.packing": CORE,
    "quikft.bits": CORE,
    "quikft.arch": CORE,
    "quikft.atomic": CORE,
    "quikft.hardware": CORE,
    "quikft.runinfo": CORE,
    "quikft.data": CORE,
    # the checkpoint contract
    "quikft.format.layout": FORMAT,
    "quikft.format.protocol": FORMAT,
    "quikft.format.header": FORMAT,
    "quikft.format.reader": FORMAT,
    "quikft.format.shards": FORMAT,
    "quikft.validation": FORMAT,
    # the quantized layer and its kernels
    "quikft.nn": NN,
    # whole packed models: written, loaded, inspected, converted; any model loaded
    "quikft.format": MODELS,
    "quikft.models": MODELS,
    # evaluation (the jobs' quick perplexity included)
    "quikft.eval": EVAL,
    "quikft.generation": EVAL,
    # the two jobs and the integrations
    "quikft.jobs": JOBS,  # the quantize job: its streaming output, resume state and block weights reading
    "quikft.quantize": JOBS,  # the public re-export of quikft.jobs.quantize.quantize
    "quikft.recovery": JOBS,
    "quikft.integrations": JOBS,
    "quikft.hf": JOBS,
    # the command line and the reports (recovery modes name their rows), and the public names
    # `import quikft` and its compatibility shim give
    "quikft.cli": CLI,
    "quikft.eval.report": CLI,
    "quikft.checkpoint": CLI,
    "quikft": CLI,
}


def floor_of(module: str, floors: dict[str, int] = FLOORS) -> int | None:
    """The floor of ``module``: its own entry, else its nearest package's (the root ``quikft`` counts
    for itself only, so a module nobody placed has no floor)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in floors and (prefix != "quikft" or module == "quikft"):
            return floors[prefix]
    return None


def upward_imports(graph: dict[str, set[str]], floors: dict[str, int] = FLOORS) -> list[str]:
    """Every import from a module to one on a higher floor, as readable lines."""
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if floor_of(target, floors) > floor_of(name, floors):
                found.append(f"{name} ({FLOOR_NAMES[floor_of(name, floors)]}) imports {target} "
                             f"({FLOOR_NAMES[floor_of(target, floors)]})")
    return found


def test_every_module_has_a_floor():
    unplaced = sorted(name for name in import_graph() if floor_of(name) is None)
    assert not unplaced, f"add {unplaced[0]} (or its package) to FLOORS in tests/test_layering.py"


def test_no_import_runs_up_the_floors():
    upward = upward_imports(import_graph())
    assert not upward, "\n".join(upward)


def test_the_floors_check_finds_upward_imports():
    floors = {"quikft.config": CORE, "quikft.nn": NN, "quikft.format.layout": FORMAT, "quikft.format": MODELS}
    assert floor_of("quikft.nn.quik_linear", floors) == NN and floor_of("quikft.format.writer", floors) == MODELS
    assert floor_of("quikft.format.layout", floors) == FORMAT and floor_of("quikft.other", floors) is None
    graph = {"quikft.nn.quik_linear": {"quikft.format.layout", "quikft.config"},
             "quikft.format.layout": {"quikft.config"}, "quikft.config": set()}
    assert upward_imports(graph, floors) == []
    graph["quikft.format.layout"].add("quikft.nn.quik_linear")
    assert upward_imports(graph, floors) == ["quikft.format.layout (format) imports quikft.nn.quik_linear (nn)"]


def _within(name: str, packages: tuple[str, ...]) -> bool:
    """``name`` is one of ``packages`` or a module inside one (``quikft.quant`` holds ``quikft.quant.gptq``,
    not ``quikft.quantize``)."""
    return any(name == package or name.startswith(f"{package}.") for package in packages)


def test_what_the_floors_do_not_say():
    """Stricter than the floors: the config imports nothing; the format reaches no quantizer code (it
    stores whatever has the shape of quikft.format.protocol) and its contract no model code; nothing
    imports the CLI or the compatibility shim (the package imports the format itself)."""
    graph = import_graph()
    assert graph["quikft.config"] == set(), "the config layer imports nothing from quikft"
    for name in (name for name in graph if name == "quikft.format" or name.startswith("quikft.format.")):
        quantizer = sorted(t for t in _reachable(graph, name) if _within(t, ("quikft.quant",)))
        assert not quantizer, f"{name} imports {quantizer[0]}"
    for name in ("quikft.format.layout", "quikft.format.protocol", "quikft.format.header", "quikft.format.reader",
                 "quikft.format.shards"):
        model_code = sorted(t for t in _reachable(graph, name) if t.startswith(("quikft.nn", "quikft.arch")))
        assert not model_code, f"{name} imports {model_code[0]}"
    for name, targets in graph.items():
        assert "quikft.cli" not in targets, f"{name} imports the CLI"
        assert "quikft.checkpoint" not in targets, f"{name} imports quikft.checkpoint"


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


# Architecture families as transformers names them (model_type and class-name stems). Only the
# adapter (quikft/arch/) may branch on them; elsewhere they may appear in comments and docstrings.
FAMILIES = re.compile(r"(?<![a-z0-9])(llama\d*|mistral|mixtral|qwen\d*(?:_moe)?|gemma\d*|phi\d*|falcon|opt|gpt2|"
                      r"gpt_?neox|gptj|bloom|mpt|olmo\w*|deepseek\w*|starcoder\w*|granite|cohere|dbrx|jamba)"
                      r"(?![a-z0-9-])")  # not "opt-in"


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def family_names(source: str) -> list[str]:
    """Family names in the code of ``source``: identifiers and string literals, docstrings left out."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            words = [node.value]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words = [node.name]
        else:
            words = [getattr(node, field) for field in ("id", "attr", "arg") if isinstance(getattr(node, field, None), str)]
        found += [match.group(0) for word in words if (match := FAMILIES.search(word.lower()))]
    return found


def test_only_the_architecture_adapter_names_model_families():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "arch":
            continue
        found = family_names(path.read_text())
        assert not found, f"{path.relative_to(PACKAGE)} names the family {found[0]!r}: ask quikft.arch instead"


def test_the_family_check_reads_code_not_prose():
    assert family_names('"""Gemma alternates sliding and global attention."""\n# like Llama\nx = 1\n') == []
    assert family_names('if config.model_type == "mixtral":\n    pass\n') == ["mixtral"]
    assert family_names("def unfuse_qwen2_moe(block): ...\n") == ["qwen2_moe"]
    assert family_names('raise ValueError("needs an opt-in")\n') == []


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
