"""`python -m stages.link`: your model into models/<recipe>/<role> as file links, which DVC hashes."""
import json
import shutil
import subprocess

from stages import link
from tests.conftest import ROOT, assert_one_line_error, env, run_stage, sh


def real_run_project(tmp_path, monkeypatch):
    """A folder with the project's params.yaml set for a real-model run (`stand_in: {}`), made the cwd."""
    text = (ROOT / "params.yaml").read_text(encoding="utf-8")
    head, rest = text.split("\nstand_in:", 1)
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_text(head + "\nstand_in: {}\n" + rest[rest.index("\ndata:"):], encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def a_model(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"architectures": ["InternLM2ForCausalLM"]}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_links_each_file_and_replaces_its_own_links(tmp_path, monkeypatch, capsys):
    project = real_run_project(tmp_path / "p", monkeypatch)
    source = a_model(tmp_path / "internlm2-chat-1_8b")
    code, err = run_stage(link, capsys, "llm", str(source))
    assert code == 0, err
    target = project / "models/assistant/llm"
    assert sorted(f.name for f in target.iterdir()) == ["config.json", "model.safetensors"]
    assert all(f.is_symlink() and f.resolve().parent == source.resolve() for f in target.iterdir())
    other = a_model(tmp_path / "other")
    assert run_stage(link, capsys, "llm", str(other))[0] == 0  # links made here are replaced
    assert (target / "config.json").resolve().parent == other.resolve()


def test_refusals_are_one_line_and_touch_nothing(tmp_path, monkeypatch, capsys):
    project = real_run_project(tmp_path / "p", monkeypatch)
    source = a_model(tmp_path / "m")
    code, err = run_stage(link, capsys, "vision", str(source))
    assert_one_line_error(code, err, "role: the assistant recipe reads llm, not 'vision'")
    code, err = run_stage(link, capsys, "llm", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "not a model folder (no config.json)")
    own = project / "models/assistant/llm"
    own.mkdir(parents=True)
    (own / "notes.txt").write_text("mine")
    code, err = run_stage(link, capsys, "llm", str(source))
    assert_one_line_error(code, err, "models/assistant/llm: holds files of its own")
    assert (own / "notes.txt").read_text() == "mine"
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")  # stand_in: tiny would overwrite the folder
    code, err = run_stage(link, capsys, "llm", str(source))
    assert_one_line_error(code, err, "stand_in: set `stand_in: {}`")


def test_dvc_hashes_what_the_links_point_to(tmp_path):
    """The reason for file links: DVC follows a file symlink inside a dep folder (not a folder symlink)."""
    source = a_model(tmp_path / "model")
    project = tmp_path / "p"
    (project / "models/assistant/llm").mkdir(parents=True)
    for f in source.iterdir():
        (project / "models/assistant/llm" / f.name).symlink_to(f)
    sh("git", "init", "-q", cwd=project)
    sh("dvc", "init", "-q", cwd=project)
    (project / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo ok > out.txt\n    deps: [models/assistant]\n"
                                      "    outs: [out.txt]\n")
    sh("dvc", "repro", "-q", cwd=project)
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    (source / "model.safetensors").write_bytes(b"new weights")
    status = subprocess.run(["dvc", "status", "--json"], cwd=project, env=env(), capture_output=True, text=True)
    assert json.loads(status.stdout) == {"s": [{"changed deps": {"models/assistant": "modified"}}]}
