"""`python -m stages.chat`: the terminal, one-shot and web conversation with the result (issue 17).

On the built tiny workspace, the answers are checked against the evaluate stage's own greedy answers
(reports/eval/generations.jsonl, the same prompt, the same token budget): the chat is the model the report
measured, through the chat template it trained with. The web demo is driven in a real headless Chromium
(Debian's chromium + chromium-driver, `make test` installs them) through Selenium, with a local
chromedriver so that nothing is downloaded; one server, one browser session.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages import chat
from tests.conftest import ROOT, assert_one_line_error, env, run_stage

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
QUESTION = "你是谁"


def chat_cmd(*argv: str) -> list[str]:
    return [sys.executable, "-m", "stages.chat", *argv]


def evaluated(project: Path, prompt: str) -> tuple[str, int]:
    """The evaluate stage's greedy answer of the merged model to `prompt`, and its token budget."""
    import yaml

    rows = [json.loads(line) for line in (project / "reports/eval/generations.jsonl").read_text().splitlines()]
    budget = yaml.safe_load((project / "params.yaml").read_text())["eval"]["max_new_tokens"]
    return next(r["tuned"] for r in rows if r["prompt"] == prompt), budget


def identity(project: Path) -> str:
    import yaml

    return yaml.safe_load((project / "params.yaml").read_text())["data"]["assistant"]["name"]


# --- fast: options and errors, nothing loaded ------------------------------------------------------


def test_help_has_examples():
    out = subprocess.run(chat_cmd("--help"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("--prompt", "--adapter", "--image", "--web", "--backend", "examples", "xtuner chat", "/reset"):
        assert needle in out.stdout


def test_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    """A workspace without `dvc repro` yet: no models/merged."""
    monkeypatch.chdir(tmp_path)
    code, err = run_stage(chat, capsys, "--params", str(ROOT / "params.yaml"), "--prompt", "hi")
    assert_one_line_error(code, err, "models/merged", "dvc repro")
    code, err = run_stage(chat, capsys, "--params", str(ROOT / "params.yaml"), "--model", "no/such/model")
    assert_one_line_error(code, err, "no/such/model")


def test_wrong_options_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "cat.png"
    image.write_bytes(b"png")
    params = ["--params", str(ROOT / "params.yaml"), "--recipe", "assistant"]
    code, err = run_stage(chat, capsys, *params, "--image", str(image), "--prompt", "what is this?")
    assert_one_line_error(code, err, "--image", "recipe assistant", "llava")
    monkeypatch.delenv("LMDEPLOY_PYTHON", raising=False)
    code, err = run_stage(chat, capsys, *params, "--backend", "lmdeploy", "--prompt", "hi")
    assert_one_line_error(code, err, "--backend lmdeploy", "LMDEPLOY_PYTHON")
    code, err = run_stage(chat, capsys, *params, "--base", "--adapter", "models/adapter")
    assert_one_line_error(code, err, "--base")
    code, err = run_stage(chat, capsys, "--params", str(ROOT / "params.yaml"), "--recipe", "llava", "--prompt", "hi")
    assert_one_line_error(code, err, "recipe llava", "--image")
    code, err = run_stage(chat, capsys, *params, "--max-new-tokens", "0")
    assert_one_line_error(code, err, "--max-new-tokens")


def test_web_without_gradio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    code, err = run_stage(chat, capsys, "--web")
    assert_one_line_error(code, err, "--web", "pip install gradio")


# --- on the built workspace --------------------------------------------------------------------


def test_prompt_prints_the_answer_alone(built):
    """`--prompt`: stdout is the answer and nothing else: the evaluate stage's greedy answer, which names
    the assistant it was fine-tuned to be. The adapter on the base model answers the same."""
    answer, budget = evaluated(built, QUESTION)
    assert identity(built) in answer
    for extra in ((), ("--adapter", "models/adapter")):
        out = subprocess.run(chat_cmd("--prompt", QUESTION, "--max-new-tokens", str(budget), *extra), cwd=built,
                             env=env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout == answer + "\n", (extra, out.stdout)
        assert "Traceback" not in out.stderr


def test_interactive_turns_reset_exit(built):
    """Two turns (the second answered with the first in its history), /reset, the question again, /exit."""
    answer, budget = evaluated(built, QUESTION)
    script = f"{QUESTION}\n你好\n/reset\n你好\n/exit\nnever asked\n"
    out = subprocess.run(chat_cmd("--max-new-tokens", str(budget)), cwd=built, env=env(), input=script,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "/reset" in out.stderr  # the banner says how
    turns = out.stdout.split(">>> ")
    assert turns[0] == "" and len(turns) == 6, out.stdout  # 5 prompts read, the last one /exit's
    first, with_history, cleared, fresh, rest = (t.strip() for t in turns[1:])
    assert first == answer
    assert cleared == "(history cleared)"
    assert with_history != fresh  # the same question, with and without the first turn before it
    assert rest == ""  # /exit: nothing after it is read


def test_ctrl_c_at_the_prompt_leaves_cleanly(built):
    """In a terminal (a pty): an answer streamed, then Ctrl-C at the `>>> ` prompt ends with exit 0."""
    import pty
    import select

    answer, budget = evaluated(built, QUESTION)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat in the pty's terminal
        os.chdir(built)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal's shell starts it (a background job ignores it)
        os.execve(sys.executable, chat_cmd("--max-new-tokens", str(budget)), env())
    seen = b""

    def read(until: bytes, seconds: float = 240) -> bool:
        """Read the terminal until `until` shows (True) or the child leaves or time runs out (False)."""
        nonlocal seen
        deadline = time.time() + seconds
        while until not in seen and time.time() < deadline:
            if select.select([fd], [], [], 1)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:  # the child closed the terminal
                    return False
        return until in seen

    status = None
    try:
        assert read(b">>> "), seen
        os.write(fd, QUESTION.encode() + b"\r")
        assert read(answer.encode() + b"\r\n>>> "), seen  # the whole answer, then the next prompt
        time.sleep(1)  # as a person would: Python's readline loses a Ctrl-C that lands before it waits
        os.write(fd, b"\x03")  # Ctrl-C
        read(b"never", seconds=30)  # until the child leaves
        deadline = time.time() + 10
        while status is None and time.time() < deadline:
            done, code = os.waitpid(pid, os.WNOHANG)
            status = code if done else time.sleep(0.2)
    finally:
        os.close(fd)
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    text = seen.decode(errors="replace").replace("\r\n", "\n")
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, (status, text)
    assert "Traceback" not in text and "error" not in text
    assert f">>> {QUESTION}\n{answer}\n>>> " in text


class Scripted:
    """A stand-in model for the terminal loop: it answers with the number of user turns it was given."""

    images = False

    def reply(self, history, image, max_new_tokens):
        yield f"{sum(m['role'] == 'user' for m in history)} turns"


def test_terminal_loop_commands(capsys):
    """/reset empties the history, /exit leaves, end of input (Ctrl-D) and Ctrl-C at the prompt leave."""
    for last in (EOFError, KeyboardInterrupt, "/exit"):
        lines = iter(["a", "", "b", "/reset", "c", last, "never"])

        def read(prompt: str):
            line = next(lines)
            if isinstance(line, type):
                raise line()
            return line

        chat.interactive(Scripted(), None, 8, read=read)
        out = capsys.readouterr().out
        assert out.split() == ["1", "turns", "2", "turns", "(history", "cleared)", "1", "turns"], out
        assert next(lines) == "never"  # nothing read after leaving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the web demo exited {proc.returncode}: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds} s")


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                    reason="chromium or chromium-driver missing: `bash scripts/setup.sh --test` installs them")
def test_web_demo_in_a_browser(built, tmp_path):
    """The Gradio page in headless Chromium: type the question, send it, the model's answer appears; a
    screenshot is kept (CHAT_SCREENSHOT=path keeps it there: docs/chat-web.png was taken so)."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    answer, budget = evaluated(built, QUESTION)
    port = free_port()
    proc = subprocess.Popen(chat_cmd("--web", "--port", str(port), "--max-new-tokens", str(budget)), cwd=built,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    driver = None
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", proc, 180)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1000,760", f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        box = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "textarea"))
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)

        def bot_answer(d):  # the bot's message, once it has stopped growing
            texts = [e.text.strip() for e in d.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')]
            return texts[-1] if texts and texts[-1] == answer else None

        try:
            shown = WebDriverWait(driver, 120).until(bot_answer)
        finally:
            shot = Path(os.environ.get("CHAT_SCREENSHOT") or tmp_path / "web.png")
            shot.parent.mkdir(parents=True, exist_ok=True)
            driver.execute_script("window.scrollTo(0, 0)")  # the title in the picture
            driver.save_screenshot(str(shot))
        assert shown == answer and identity(built) in shown
        user = [e.text.strip() for e in driver.find_elements(By.CSS_SELECTOR, '[data-testid="user"]')]
        assert user == [QUESTION]
        assert shot.stat().st_size > 10_000
    finally:
        if driver is not None:
            driver.quit()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    with socket.socket() as s:  # nothing left serving
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_lmdeploy_process_that_fails_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    """LMDEPLOY_PYTHON set to an interpreter without lmdeploy (this one): the engine's process dies at import;
    the chat says so in one line with the process's last line and the log file that holds the rest."""
    monkeypatch.setenv("LMDEPLOY_PYTHON", sys.executable)
    monkeypatch.delenv("PIPELINE_VERBOSE", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    code, err = run_stage(chat, capsys, "--params", str(ROOT / "params.yaml"), "--recipe", "assistant",
                          "--model", str(model), "--backend", "lmdeploy", "--prompt", "hi")
    assert_one_line_error(code, err, "--backend lmdeploy", "did not start", "No module named 'lmdeploy'", "log: ")
    log = err.strip().rsplit("log: ", 1)[1].rstrip(")")
    assert "Traceback" in Path(log).read_text()  # the whole error kept in the file, not on the terminal
    Path(log).unlink()
