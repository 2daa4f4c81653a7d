"""Shared fixtures. The tiny pipeline is built once per session with the real `dvc repro`, in a
temporary git clone of the working tree; tests that change things work on copies of it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One thread per process, for the tests and every stage they start (set before torch is imported). The tiny
# models gain nothing from a second thread, and OpenMP's spinning threads are ruinous on a busy machine:
# a training step of the tiny LLM measured 37-69 ms on one thread against 405-507 ms on two, on 2 cores
# shared with other work. The two-process tests then take one core each. OMP_NUM_THREADS=... overrides.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
BIN = str(Path(sys.executable).parent)


def env() -> dict:
    """The environment for subprocesses: this interpreter's bin first (DVC's `python`), a git author."""
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_NAME="test",
             GIT_COMMITTER_EMAIL="test@example.com", PYTHONPATH=str(ROOT))
    return e


def sh(*cmd: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def clone_worktree(dest: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files into a fresh git repo (a clean clone of
    what is in the working tree now, committed or not)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "test clone", cwd=dest)
    return dest


def pytest_collection_modifyitems(config, items):
    """Every test that needs a built project (the `built` fixture, directly or through another) is an
    e2e test: `pytest -m "not e2e"` then runs no `dvc repro` at all."""
    for item in items:
        if "built" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """A clean clone on which the real `dvc repro` has run once."""
    project = clone_worktree(tmp_path_factory.mktemp("built"))
    proc = sh("dvc", "repro", cwd=project)
    repro_output(project).write_text(proc.stdout + proc.stderr, encoding="utf-8")
    return project


def repro_output(project: Path) -> Path:
    """Where the `built` fixture keeps what its `dvc repro` printed (beside the project, not in it)."""
    return project.with_name(project.name + "-repro-output.txt")


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran, in order."""
    return re.findall(r"Running stage '([\w@-]+)'", output)


def repro_in_copy(project: Path, dest: Path) -> str:
    """`dvc repro` in a copy of `project` at `dest` (the original stays as it is); its output."""
    shutil.copytree(project, dest, symlinks=True)
    return sh("dvc", "repro", cwd=dest).stdout


def recipe_experiment(built: Path, dest: Path, recipe: str) -> tuple[Path, str]:
    """A copy of the built (assistant) project at `dest`, switched to `recipe` by a real
    `dvc exp run -S recipe=...`; returns the copy and the command's output."""
    shutil.copytree(built, dest, symlinks=True)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=dest)
    return dest, sh("dvc", "exp", "run", "-S", f"recipe={recipe}", "-n", recipe, cwd=dest).stdout


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the built project, made the working directory."""
    dest = tmp_path / "project"
    shutil.copytree(built, dest, symlinks=True)
    monkeypatch.chdir(dest)
    return dest


def run_stage(module, capsys, *argv: str) -> tuple[int, str]:
    """Run a stage's main in-process through its real entry point; return (exit code, stderr)."""
    from stages.errors import run

    capsys.readouterr()
    try:
        run(module.main, list(argv))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The contract for bad input: non-zero exit, one line on stderr, no traceback, names the culprit."""
    assert code != 0, "expected a failure"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def tree_digest(folder: Path) -> dict:
    """Path -> bytes of every file under `folder` (to prove a stage left it untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
