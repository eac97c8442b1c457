"""`dsv4 generate --chat`: one-shot, message files, and interactive use (stdin and a pty)."""
import json
import os
import pty
import select
import subprocess
import sys
import time

from test_cli import dsv4, one_line_error


def test_one_shot_chat_mode(tiny_dir):
    r = dsv4("generate", "-m", str(tiny_dir), "--chat", "-p", "Hi", "--system", "Be brief.",
             "-n", "6", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[answer]\n")
    assert "｜DSML｜" not in r.stdout and "<｜" not in r.stdout


def test_thinking_mode_shows_reasoning_apart(tiny_dir):
    r = dsv4("generate", "-m", str(tiny_dir), "--chat", "--thinking", "-p", "Hi", "-n", "6",
             "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[reasoning]\n")


def test_messages_file_with_tools(tiny_dir, tmp_path):
    conv = {"tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conv))
    r = dsv4("generate", "-m", str(tiny_dir), "--chat", "--messages", str(path), "-n", "5",
             "--greedy")
    assert r.returncode == 0, r.stderr
    path.write_text("[1, 2]")
    one_line_error(dsv4("generate", "-m", str(tiny_dir), "--chat", "--messages", str(path)),
                   "list of message objects")


def test_chat_flags_need_chat(tiny_dir):
    one_line_error(dsv4("generate", "-m", str(tiny_dir), "-p", "x", "--system", "s"),
                   "--system", "needs --chat")


def test_interactive_from_stdin_keeps_history(tiny_dir):
    lines = "first question\n/unknown\nsecond\n/reset\nthird\n/exit\nnever sent\n"
    r = dsv4("generate", "-m", str(tiny_dir), "--chat", "-i", "-n", "3", "--greedy",
             stdin=lines)
    assert r.returncode == 0, r.stderr
    # three turns answered, each with its stats line; /reset acknowledged; /exit stops
    assert r.stderr.count("prompt:") == 3
    assert "(conversation reset)" in r.stderr and "unknown command /unknown" in r.stderr
    prompts = [int(ln.split()[1]) for ln in r.stderr.splitlines() if ln.startswith("prompt:")]
    assert prompts[1] > prompts[0] and prompts[2] < prompts[1]   # history, then reset


def _read_until(fd, done, timeout=120.0) -> bytes:
    buf, end = b"", time.time() + timeout
    while not done(buf) and time.time() < end:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:          # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_on_a_terminal(tiny_dir):
    master, slave = pty.openpty()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dsv4.cli.main", "generate", "-m",
                             str(tiny_dir), "--chat", "-n", "3", "--greedy", "-q"],
                            stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    try:
        first = _read_until(master, lambda b: b"> " in b)
        assert b"dsv4 chat (chat mode)" in first          # a terminal starts interactive mode
        os.write(master, b"hello\n")
        answer = _read_until(master, lambda b: b"> " in b.split(b"hello", 1)[-1])
        assert b"hello" in answer                           # echoed, answered, prompted again
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)
