"""Shared fixtures. The tiny pipeline is built once per session with the real `dvc repro`, in a
temporary git clone of the working tree; tests that change things work on copies of it."""
from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# One thread per process, for the tests and every stage they start (set before torch is imported). The tiny
# models gain nothing from a second thread, and OpenMP's spinning threads are ruinous on a busy machine:
# a training step of the tiny LLM measured 37-69 ms on one thread against 405-507 ms on two, on 2 cores
# shared with other work. The two-process tests then take one core each. OMP_NUM_THREADS=... overrides.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
# Python's own bytecode cache, on for this run and every process it starts, whatever the machine sets: each module is
# compiled the first time a process imports it, and its .pyc is read from then on. `make test` installs the packages
# without bytecode (scripts/setup.sh): compiling all of them took 26 s of setup, for the fraction the suite imports.
# Where PYTHONDONTWRITEBYTECODE is set (this suite's CI machine) no process would write it, and each of the suite's
# ~250 stage processes would compile its imports (torch, transformers, XTuner) again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
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


# What a test clone leaves out: the GPU calls' recorded results (no stage reads them; the tests that read them read
# the working tree's own), 236 of a clone's 500 files.
NOT_CLONED = ("benchmarks/results/",)


def clone_worktree(dest: Path) -> Path:
    """Copy the tracked and untracked-but-not-ignored files (but NOT_CLONED) into a fresh git repo (a clean
    clone of what is in the working tree now, committed or not), its objects packed.
    Packed, as a clone from a remote has them: committed loose, they were 592 files in 243 folders of the
    built project's 1,232 files in 359 folders, and each test's copy of it creates every one of them (0.3 ms
    a file, 0.7 ms a folder on the 2-core machine): its 1.2 s of setup, 60-odd times a run."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file() and not name.startswith(NOT_CLONED):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    sh("git", "init", "-q", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "test clone", cwd=dest)
    sh("git", "gc", "-q", cwd=dest)
    return dest


# Over several processes (pytest-xdist, `-n auto --dist loadgroup --no-loadscope-reorder` in pyproject.toml), the
# processes take the tests in the order pytest_collection_modifyitems sets, the tests of an xdist group all on
# the process that takes the group's first:
#   1. the llava workspace's (group llava_built): the first builds `built`, then the workspace, the longest chain
#   2. the tests that need no built project (the other process runs them meanwhile)
#   3. the internvl workspace's (group internvl_built)
#   4. the other e2e tests: first the tests marked two_processes (group two_processes, one process runs them all),
#      then the LONGEST first (as `pytest --durations` measured them), so that what is left at the end is short.
#      A two-process test trains in two processes, but most of its time is one process starting or finishing
#      (the stage, torchrun, the workers' imports): run last and alone they kept one core of two busy on
#      average (150 s of CPU in 146 s, AMD EPYC), so they now run beside the other process's tests
WORKSPACES = ("llava_built", "internvl_built")
LONGEST = ("test_killed_training_resumes_and_ends_where_an_uninterrupted_run_ends",
           "test_the_llama_format_case_runs_the_whole_pipeline", "test_rerun_gives_a_byte_identical_adapter",
           "test_a_mixing_sweep_runs_as_a_dvc_queue_and_compares", "test_scoring_beside_the_trainer_is_read_back_by_select",
           "test_lora_rank_experiment_reruns_only_the_training_chain", "test_the_rule_alone_reruns_from_select_on",
           "test_changed_inputs_start_clean")


@pytest.hookimpl(wrapper=True)  # around pytest-xdist's, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Every test that needs a built project (the `built` fixture, directly or through another) is an
    e2e test: `pytest -m "not e2e"` then runs no `dvc repro` at all. Over several processes: the groups and
    the order above."""
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "built" in names:
            item.add_marker(pytest.mark.e2e)
        for workspace in WORKSPACES:
            if workspace in names:
                item.add_marker(pytest.mark.xdist_group(workspace))
        if item.get_closest_marker("two_processes"):
            item.add_marker(pytest.mark.xdist_group("two_processes"))
    if worker():

        def rank(item) -> tuple[int, int]:
            names = getattr(item, "fixturenames", ())
            if item.get_closest_marker("two_processes"):
                return 4, -1
            if WORKSPACES[0] in names:
                return 1, 0
            if "built" not in names:
                return 2, 0
            if any(w in names for w in WORKSPACES[1:]):
                return 3, 0
            name = getattr(item, "originalname", item.name)
            return 4, LONGEST.index(name) if name in LONGEST else len(LONGEST)

        items.sort(key=rank)
    yield
    # pytest-xdist groups a test by adding "@group" to its node ID, which pytest 9.2 ignores (constraints.txt):
    # each process would build the workspaces again. Such a run fails the grouped tests, saying why.
    if getattr(config.option, "loadgroup", False):
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[UNGROUPED] = (f"pytest-xdist's --dist loadgroup does not group tests under pytest "
                                         f"{pytest.__version__} (pytest-xdist issue 1386): install pytest==9.1.1 "
                                         "(constraints.txt), or run in one process (-n 0)")


UNGROUPED = pytest.StashKey[str]()


def pytest_runtest_setup(item):
    if UNGROUPED in item.stash:
        pytest.fail(item.stash[UNGROUPED], pytrace=False)


def worker() -> str | None:
    """This process's pytest-xdist worker name (gw0, gw1, ...); None in a run in one process."""
    return os.environ.get("PYTEST_XDIST_WORKER")


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one process per core this process may run on, at most 2 (what the suite is balanced for:
    `built` first, then the two image workspaces side by side). PYTEST_XDIST_AUTO_NUM_WORKERS=N overrides."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    return max(1, min(2, len(os.sched_getaffinity(0))))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(folder)`, for a session fixture, once per run: in one process, into a new temporary folder; over
    several (pytest-xdist), into the folder `name` of the run's temporary folder, which its workers share:
    the first worker to ask builds it while the others wait on a lock, then they all use it. A build that
    failed fails every worker's tests with its error, and is not tried again."""
    if not worker():
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # <run>/popen-gw0 -> <run>
    folder, failed, done = root / name, root / f"{name}.failed", root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, or the process ends
        if failed.exists():
            raise AssertionError(f"{name}: the build failed in another worker:\n{failed.read_text()}")
        if not done.exists():
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                failed.write_text(traceback.format_exc(), encoding="utf-8")
                raise
            done.write_text(worker(), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """A clean clone on which the real `dvc repro` has run once (once per run, whichever the processes). At the
    end, its files that copies link (`copy_project`) must hold the bytes they held at the start: a test that
    wrote one in place would have written into every copy, and fails the run here, naming the file."""

    def build(folder: Path) -> None:
        project = clone_worktree(folder)
        # the stages' bytecode, as in a user's project after its first run (each copy of it then starts with it)
        compile_stages(project)
        proc = sh("dvc", "repro", cwd=project)
        repro_output(project).write_text(proc.stdout + proc.stderr, encoding="utf-8")

    folder = built_once(tmp_path_factory, "built", build)
    before = linked_digests(folder)
    yield folder
    changed = [name for name, digest in linked_digests(folder).items() if before.get(name) != digest]
    assert not changed, f"linked files of the built project changed in place (copy_project's LINKED): {changed}"


def compile_stages(project: Path) -> None:
    """The bytecode of all of `project`'s stages/, as Python writes it beside the modules a run imports (DVC ignores
    it: .dvcignore)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "stages"], cwd=project, env=env(), check=True,
                   capture_output=True)


def repro_output(project: Path) -> Path:
    """Where the `built` fixture keeps what its `dvc repro` printed (beside the project, not in it)."""
    return project.with_name(project.name + "-repro-output.txt")


def ran(output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran, in order."""
    return re.findall(r"Running stage '([\w@-]+)'", output)


def repro_in_copy(project: Path, dest: Path) -> str:
    """`dvc repro` in a copy of `project` at `dest` (the original stays as it is); its output."""
    copy_project(project, dest)
    return sh("dvc", "repro", cwd=dest).stdout


# The image recipes' workspaces keep the LLM stand-in at its smallest (64 wide, 361k parameters): the default's
# 192-wide one is sized for the assistant's identity target (README, the mixing sweep), and would triple the
# CPU time of each image workspace for nothing these tests look at.
SMALL_LLM = ("stand_in.tiny.llm.hidden_size=64", "stand_in.tiny.llm.intermediate_size=192",
             "stand_in.tiny.llm.pretrain_steps=200")


def experiment_in_copy(built: Path, dest: Path, name: str, *settings: str) -> str:
    """A copy of the built project at `dest`, committed as its baseline, then a real `dvc exp run -S SETTING ...
    -n NAME` in it; the command's output."""
    copy_project(built, dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "--allow-empty", "-m", "baseline", cwd=dest)
    return sh("dvc", "exp", "run", *[arg for setting in settings for arg in ("-S", setting)], "-n", name, cwd=dest).stdout


def recipe_experiment(built: Path, dest: Path, recipe: str) -> tuple[Path, str]:
    """A copy of the built (assistant) project at `dest`, switched to `recipe` by a real
    `dvc exp run -S recipe=...` (with SMALL_LLM); returns the copy and the command's output."""
    return dest, experiment_in_copy(built, dest, recipe, f"recipe={recipe}", *SMALL_LLM)


# The files of a built project that nothing writes in place, which a copy of it links (a hard link, no bytes copied):
# DVC's cache (content-addressed, read-only; DVC adds new files, never rewrites one) and the weights of the trainer's
# checkpoints (stages/background_save.py writes a new file and renames it into place, stages/io.py `output_dir` a
# new folder; DVC removes an output before its stage reruns). A test that damages a file does it in a copied one
# (models/adapter.pth, models/adapter/, models/merged/). Linked, a copy of the built project writes 26 MB, not 190.
LINKED = (".dvc/cache/",)
LINKED_WEIGHTS = ("models/checkpoints/", "models/work/")


def linked(name: str) -> bool:
    """Whether `copy_project` links the file at `name` (relative to the project) rather than copying it."""
    return name.startswith(LINKED) or (name.startswith(LINKED_WEIGHTS) and name.endswith(".pth"))


def linked_digests(project: Path) -> dict:
    """Path -> MD5 of each file of `project` that copies of it link."""
    return {name: hashlib.md5(path.read_bytes()).hexdigest() for path in sorted(project.rglob("*"))
            if path.is_file() and linked(name := path.relative_to(project).as_posix())}


def copy_project(built: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    """A copy of the built project at `dest`, without the paths (relative to it) in `leave_out`; its LINKED
    files and the .pth files under LINKED_WEIGHTS are hard links to the original's."""
    left = {built / name for name in leave_out}

    def copy(src: str, dst: str) -> None:
        if linked(os.path.relpath(src, built)):
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(built, dest, symlinks=True, copy_function=copy,
                    ignore=lambda d, names: [n for n in names if Path(d) / n in left])
    return dest


@pytest.fixture
def project(built: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the built project, made the working directory."""
    dest = copy_project(built, tmp_path / "project")
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
