"""dvc.yaml's code deps are exact (issue 14): static analysis only, no DVC run, seconds.

For every stage whose `cmd` runs `python -m stages.X`, the stage's code is the import closure of
`stages.X` over the project's own modules: every `import stages.a`, `from stages.a import b`,
`from stages import a` (and relative imports) anywhere in a module, function bodies included (the
stages import lazily), followed recursively. Every module file of that closure must lie in one of the
stage's deps (the file itself or a folder holding it).

`stages/__init__.py` runs at every `python -m stages.X`, but it is required only while it holds more
than a docstring (a docstring-only file cannot change an output).

Files the code reads by path (the bonus rule, deliberately simple): a module-level constant whose
value evaluates statically to a path inside stages/ (built from `Path(__file__)`, `.parent`,
`.resolve()`, `.with_name("...")`, `/ "..."`, earlier constants of the same module, lists of these), e.g.
`checks.SCHEMAS`, `paths.TEMPLATES`, `paths.INTERNVL_CODE`. A module of the closure reads it when it
loads the name in its own module, imports it with `from stages.M import NAME`, or writes `M.NAME` after
binding `stages.M` to `M`. Such a path is covered by a dep that is it, holds it, or lies inside it (a
stage may depend on just the files of the folder it reads, as pretrain on llava.py.j2). The rule works
per module, not per function: DATA_NOT_READ lists, with reasons, where a stage imports the module only
for something else.

Deps with `${...}` are resolved from params.yaml (and dvc.yaml's `vars`) where they can be; none of
them is code.
"""
from __future__ import annotations

import ast
import functools
import re
from collections import deque
from pathlib import Path, PurePosixPath

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "stages"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
ENTRY = re.compile(r"python[\w.]*\s+-m\s+(" + PACKAGE + r"(?:\.\w+)+)")

# (stage, path): why the stage imports the module that reads `path` but never reaches the read
DATA_NOT_READ: dict[tuple[str, str], str] = {}


# --- the project's modules ---------------------------------------------------------------------

def module_file(name: str) -> str | None:
    """`stages.a.b` -> 'stages/a/b.py' (or its package's __init__.py); None if it is no project file."""
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f.relative_to(ROOT).as_posix()
    return None


def module_name(file: str) -> str:
    parts = PurePosixPath(file).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def tree(file: str) -> ast.Module:
    return ast.parse((ROOT / file).read_text(encoding="utf-8"), filename=file)


def import_nodes(file: str, module_level: bool = False):
    """Import statements of `file`: all of them, or only those that run when it is imported (not in a
    function body, not under `if __name__ == "__main__"` or `if TYPE_CHECKING`)."""
    if not module_level:
        yield from (n for n in ast.walk(tree(file)) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    todo = list(tree(file).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and ("__main__" in ast.unparse(node.test)
                                           or "TYPE_CHECKING" in ast.unparse(node.test)):
            todo.extend(node.orelse)
        else:
            todo.extend(c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt))


def imported_base(file: str, node: ast.ImportFrom) -> str | None:
    """The module an ImportFrom names, relative imports resolved."""
    if not node.level:
        return node.module
    package = module_name(file).split(".")
    if not file.endswith("__init__.py"):
        package = package[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imports(file: str, module_level: bool = False) -> set[str]:
    """Project module files that `file` imports."""
    names: set[str] = set()
    for node in import_nodes(file, module_level):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        else:
            base = imported_base(file, node)
            if base:
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    out = set()
    for name in names:
        if name.split(".")[0] != PACKAGE:
            continue
        parts = name.split(".")  # `import stages.a.b` also imports stages and stages.a
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]))
            if f and f != file:
                out.add(f)
    return out


def closure(entry: str) -> dict[str, str | None]:
    """Every project module file `entry` imports, recursively: file -> the file that first imports it."""
    start = module_file(entry)
    assert start, f"{entry}: no such module"
    via: dict[str, str | None] = {start: None}
    for f in imports(start):
        via.setdefault(f, start)
    queue = deque(via)
    while queue:
        f = queue.popleft()
        for g in sorted(imports(f)):
            if g not in via:
                via[g] = f
                queue.append(g)
    return via


def trivial(file: str) -> bool:
    """Nothing but a docstring and `from __future__` imports."""
    body = tree(file).body
    return all((isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str))
               or (isinstance(n, ast.ImportFrom) and n.module == "__future__") for n in body)


def all_modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py")
                  if all(part.isidentifier() for part in p.relative_to(ROOT).with_suffix("").parts))


# --- paths the code reads ----------------------------------------------------------------------

def _eval_path(node: ast.expr, file: str, env: dict) -> list[PurePosixPath] | None:
    """A path expression of a module-level constant, statically; None if it is none we follow."""
    if isinstance(node, ast.Name):
        if node.id == "__file__":
            return [PurePosixPath(file)]
        return env.get(node.id)
    if isinstance(node, (ast.List, ast.Tuple)):
        out = []
        for elt in node.elts:
            v = _eval_path(elt, file, env)
            if v is None:
                return None
            out += v
        return out
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        v = _eval_path(node.value, file, env)
        return v and [PurePosixPath(*p.parts[:-1]) if len(p.parts) > 1 else PurePosixPath(".") for p in v]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(node.right, ast.Constant):
        v = _eval_path(node.left, file, env)
        return v and [p / str(node.right.value) for p in v]
    if isinstance(node, ast.Call):
        fn = node.func
        if isinstance(fn, ast.Attribute) and fn.attr in ("resolve", "absolute") and not node.args:
            return _eval_path(fn.value, file, env)
        if isinstance(fn, ast.Attribute) and fn.attr == "with_name" and len(node.args) == 1 \
                and isinstance(node.args[0], ast.Constant):
            v = _eval_path(fn.value, file, env)
            return v and [p.with_name(str(node.args[0].value)) for p in v]
        if ast.unparse(fn) in ("Path", "pathlib.Path", "PurePosixPath") and len(node.args) == 1:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return [PurePosixPath(arg.value)]
            return _eval_path(arg, file, env)
    return None


@functools.cache
def path_constants() -> dict[tuple[str, str], frozenset[str]]:
    """(module file, NAME) -> the paths inside stages/ (existing files or folders) its value names."""
    out = {}
    for file in all_modules():
        env: dict[str, list[PurePosixPath]] = {}
        for node in tree(file).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if len(targets) == 1 and isinstance(targets[0], ast.Name):
                    value = _eval_path(node.value, file, env)
                    if value is not None:
                        env[targets[0].id] = value
                        inside = frozenset(p.as_posix() for p in value
                                           if p.parts[:1] == (PACKAGE,) and len(p.parts) > 1 and (ROOT / p).exists())
                        if inside:
                            out[(file, targets[0].id)] = inside
    return out


def reads(file: str) -> dict[str, str]:
    """Paths inside stages/ that `file` reads through a path constant: path -> 'M.NAME'."""
    consts = path_constants()
    used: dict[str, str] = {}

    def use(owner: str, name: str) -> None:
        for p in consts.get((owner, name), ()):
            used.setdefault(p, f"{module_name(owner)}.{name}")

    aliases: dict[str, str] = {}
    for node in ast.walk(tree(file)):
        if isinstance(node, ast.ImportFrom):
            base = imported_base(file, node)
            owner = module_file(base) if base else None
            for a in node.names:
                if owner:
                    for name in ([n for (m, n) in consts if m == owner] if a.name == "*" else [a.name]):
                        use(owner, name)
                sub = module_file(f"{base}.{a.name}") if base else None
                if sub:
                    aliases[a.asname or a.name] = sub
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and module_file(a.name):
                    aliases[a.asname] = module_file(a.name)
    for node in ast.walk(tree(file)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            use(file, node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            use(aliases[node.value.id], node.attr)
    return used


# --- dvc.yaml ---------------------------------------------------------------------------------

RECIPES = ("assistant", "llava", "internvl")  # stages.recipes.NAMES
RECIPE_PACKAGE = f"{PACKAGE}/recipes/"


def _lookup(key: str):
    for source in (DVC.get("vars") or [], [PARAMS]):
        for scope in (source if isinstance(source, list) else [source]):
            node = scope
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return node
    return None


def resolve(dep: str, recipe: str, key: str = "tiny") -> str | None:
    """A dep with `${...}` filled in for `recipe` (and the foreach `key`) from params.yaml; None where it
    cannot be."""
    def sub(m: re.Match) -> str:
        name = m.group(1).strip()
        v = {"recipe": recipe, "key": key}.get(name, _lookup(name))
        if v is None or isinstance(v, (dict, list)):
            raise KeyError(name)
        return str(v)
    try:
        return re.sub(r"\$\{([^}]*)\}", sub, dep).rstrip("/")
    except KeyError:
        return None


def python_stages(recipe: str) -> dict[str, dict]:
    """Stage name -> {'entries': modules its cmd runs, 'deps': its deps resolved for `recipe`} for the
    stages whose cmd runs `python -m stages.X` (foreach/matrix stages: their `do` body)."""
    out = {}
    for name, stage in (DVC.get("stages") or {}).items():
        body = stage.get("do", stage) if ("foreach" in stage or "matrix" in stage) else stage
        cmds = body.get("cmd", [])
        cmds = [cmds] if isinstance(cmds, str) else list(cmds)
        entries = sorted({m for c in cmds for m in ENTRY.findall(str(c))})
        if entries:
            deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps") or []]
            out[name] = {"entries": entries, "deps": [r for r in (resolve(d, recipe) for d in deps) if r]}
    return out


STAGES = {r: python_stages(r) for r in RECIPES}


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d + "/") for d in deps)


def other_recipe(file: str, recipe: str) -> bool:
    """A module of another recipe's package: imported only when that recipe is selected (the registry
    imports the selected package alone), so never part of `recipe`'s runs."""
    return file.startswith(RECIPE_PACKAGE) and file.count("/") >= 3 and \
        not file.startswith(f"{RECIPE_PACKAGE}{recipe}/")


@functools.cache
def step_calls(file: str) -> frozenset[str]:
    """The recipe steps `file` imports through the registry: `step(name, "prepare")` -> 'prepare'."""
    out = set()
    for node in ast.walk(tree(file)):
        if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and (getattr(node.func, "id", None) == "step" or getattr(node.func, "attr", None) == "step"):
            out.add(str(node.args[1].value))
    return frozenset(out)


def recipe_closure(entry: str, recipe: str) -> dict[str, str | None]:
    """`closure` for a run of `recipe`: the registry (stages/recipes/__init__.py) brings in the selected
    package, each `step(name, "X")` call its module X, and other recipes' modules are left out."""
    start = module_file(entry)
    assert start, f"{entry}: no such module"
    via: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        f = queue.popleft()
        found = set(imports(f))
        if f == f"{RECIPE_PACKAGE}__init__.py":
            found.add(module_file(f"{PACKAGE}.recipes.{recipe}"))
        for part in step_calls(f):
            assert module_file(f"{PACKAGE}.recipes.{recipe}.{part}"), f"{f}: no step {part!r} in recipe {recipe}"
            found.add(module_file(f"{PACKAGE}.recipes.{recipe}.{part}"))
        for g in sorted(found):
            if g not in via and not other_recipe(g, recipe):
                via[g] = f
                queue.append(g)
    return via


def code_of(stage: str, recipe: str) -> dict[str, str | None]:
    """Module file -> its first importer, over every entry module of the stage, for `recipe`."""
    via: dict[str, str | None] = {}
    for entry in STAGES[recipe][stage]["entries"]:
        for f, parent in recipe_closure(entry, recipe).items():
            via.setdefault(f, parent)
    return via


def required_code(stage: str, recipe: str) -> dict[str, str | None]:
    return {f: parent for f, parent in code_of(stage, recipe).items()
            if not (f.endswith("__init__.py") and trivial(f))}


def data_of(stage: str, recipe: str) -> dict[str, str]:
    """Paths inside stages/ the stage's code reads by path: path -> 'stages/x.py reads M.NAME'."""
    out: dict[str, str] = {}
    for f in code_of(stage, recipe):
        for p, const in reads(f).items():
            out.setdefault(p, f"{f} reads {const}")
    return out


def _chain(f: str, via: dict[str, str | None]) -> str:
    steps = [f]
    while via.get(steps[-1]):
        steps.append(via[steps[-1]])
    return " <- ".join(steps[1:])


# --- the tests ---------------------------------------------------------------------------------

def test_every_python_stage_is_analysed():
    """The parser found the stages (else the tests below would pass on nothing), and every stage whose
    cmd mentions the package runs a module of it."""
    stages = STAGES["assistant"]
    assert len(stages) >= 9, sorted(stages)
    for name, stage in DVC["stages"].items():
        if PACKAGE in str(stage.get("cmd", "")) + str(stage.get("do", {}).get("cmd", "")):
            assert name in stages, f"{name}: cmd names {PACKAGE} but no `python -m {PACKAGE}.X` found"
    for name, stage in stages.items():
        for entry in stage["entries"]:
            assert module_file(entry), f"{name}: cmd runs {entry}, which is no file"


@pytest.mark.parametrize("recipe", RECIPES)
def test_code_deps_cover_import_closure(recipe):
    missing = []
    for name in STAGES[recipe]:
        deps, via = STAGES[recipe][name]["deps"], required_code(name, recipe)
        missing += [f"  {name}: {f}  (imported by {_chain(f, via)})" for f in sorted(via) if not covered(f, deps)]
    assert not missing, f"dvc.yaml, recipe {recipe}: code a stage imports is not in its deps:\n" + "\n".join(missing)


@pytest.mark.parametrize("recipe", RECIPES)
def test_data_files_read_by_path_are_deps(recipe):
    missing = []
    for name in STAGES[recipe]:
        deps, data = STAGES[recipe][name]["deps"], data_of(name, recipe)
        for p, why in sorted(data.items()):
            if (name, p) in DATA_NOT_READ:
                continue
            if not (covered(p, deps) or any(d.startswith(p + "/") for d in deps)):
                missing.append(f"  {name}: {p}  ({why})")
    assert not missing, (f"dvc.yaml, recipe {recipe}: files a stage's code reads by path are not in its deps:\n"
                         + "\n".join(missing))


def test_data_not_read_is_current():
    stale = [f"  {name}: {p}  (no longer flagged: drop it from DATA_NOT_READ)" for (name, p) in DATA_NOT_READ
             if not any(name in STAGES[r] and p in data_of(name, r) for r in RECIPES)]
    assert not stale, "\n".join(stale)


def test_no_code_dep_outside_closure():
    """The reverse, softer (review it): a stages/ dep that none of the stage's code imports or reads,
    for any recipe (one deps list serves the three)."""
    extra = []
    for name in STAGES["assistant"]:
        used = set()
        for recipe in RECIPES:
            used |= set(code_of(name, recipe)) | set(data_of(name, recipe))
            used |= {f"{RECIPE_PACKAGE}{recipe}"} if any(u.startswith(f"{RECIPE_PACKAGE}{recipe}/") for u in used) else set()
        for d in {d for r in RECIPES for d in STAGES[r][name]["deps"]}:
            if d.split("/")[0] != PACKAGE:
                continue
            if not any(u == d or u.startswith(d + "/") or d.startswith(u + "/") for u in used):
                extra.append(f"  {name}: {d}  (not imported or read by {', '.join(STAGES['assistant'][name]['entries'])})")
    assert not extra, "dvc.yaml: code deps the stage's code does not use:\n" + "\n".join(sorted(extra))


OTHER_RECIPE_PLACES = ("stages/recipes/{}", "data/raw/{}", "data/generated/{}", "data/validated/{}", "models/{}")


@pytest.mark.parametrize("recipe", RECIPES)
def test_no_stage_depends_on_another_recipe(recipe):
    """A run of `recipe` depends on no other recipe's code, data or models, so an edit there reruns
    nothing (the LLM stand-in's text, data/raw/assistant, is the one stated exception: stand_in only)."""
    wrong = []
    for name, stage in STAGES[recipe].items():
        for other in set(RECIPES) - {recipe}:
            places = [p.format(other) for p in OTHER_RECIPE_PLACES]
            for d in stage["deps"]:
                if covered(d, places) and not (name == "stand_in" and d.startswith("data/raw/assistant/")):
                    wrong.append(f"  {name}: {d}")
    assert not wrong, f"recipe {recipe}: deps on another recipe's parts:\n" + "\n".join(wrong)


def test_no_recipe_imports_another():
    wrong = [f"  {f} imports {g}" for f in all_modules() if f.startswith(RECIPE_PACKAGE) and f.count("/") >= 3
             for g in imports(f) if other_recipe(g, f.split("/")[2])]
    assert not wrong, "a recipe package imports another recipe's:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with a cycle (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(module_level: bool) -> dict[str, set[str]]:
    return {f: imports(f, module_level) for f in all_modules()}


def test_no_import_cycles():
    """No two modules import each other, directly or round a circle, at import time or inside a function."""
    cycles = _cycles(import_graph(module_level=False))
    assert not cycles, "import cycles:\n" + "\n".join("  " + " <-> ".join(c) for c in cycles)


# commands that are not DVC stages but sit on the stages' layer: they load the selected recipe's models
# through its own code, as a stage does, and nothing imports them
COMMANDS = {"stages/chat.py": "python -m stages.chat: talk to the base, adapter or merged model of any recipe"}


def test_layers_stages_recipes_core():
    """A DVC stage module imports no other stage; a recipe imports no stage; the shared core imports no
    stage and no recipe (the registry, stages/recipes/__init__.py, is for the stages)."""
    stages = {module_file(e) for s in STAGES["assistant"].values() for e in s["entries"]} | set(COMMANDS)
    wrong = []
    for f in all_modules():
        recipe = f.startswith(RECIPE_PACKAGE) and f != f"{RECIPE_PACKAGE}__init__.py"
        for g in imports(f):
            if g in stages and g != f:
                wrong.append(f"  {f} imports the stage {g}")
            elif f not in stages and not recipe and g.startswith(RECIPE_PACKAGE) and f != f"{RECIPE_PACKAGE}__init__.py":
                wrong.append(f"  {f} (core) imports the recipe module {g}")
    assert not wrong, "layering:\n" + "\n".join(wrong)
