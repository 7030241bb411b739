"""The `mosaic` CLI as a person at a terminal meets it: a real pseudo-terminal, not mocks.

The tiny random Llama (no artifact) keeps each run to a few seconds.
"""

from __future__ import annotations

import fcntl
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Terminal:
    """``mosaic ARGS`` with a pseudo-terminal as its controlling terminal (so Ctrl-C is a SIGINT
    from the terminal, as at a shell), on stdin and stderr; stdout too unless ``stdout`` is given."""

    def __init__(self, *args: str, cache: Path, stdout: int | None = None, env: dict[str, str] | None = None):
        self.master, slave = os.openpty()

        def own_terminal() -> None:  # runs in the child, after setsid
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

        inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "MOSAIC_PROGRESS")}
        # a person's terminal: its own width, and the progress bars on unless a test turns them off
        env = {
            **inherited,
            "MOSAIC_CACHE": str(cache),
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mosaic_safety.cli", *args],
            stdin=slave, stdout=slave if stdout is None else stdout, stderr=slave,
            cwd=ROOT, env=env, start_new_session=True, preexec_fn=own_terminal,
        )  # fmt: skip
        os.close(slave)
        self.screen = b""

    def _read(self, seconds: float) -> bool:
        """Read what the program wrote; False once the terminal is closed (the program ended)."""
        ready, _, _ = select.select([self.master], [], [], seconds)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            return False
        self.screen += data
        return bool(data)

    def expect(self, text: bytes, after: int = 0, timeout: float = 120) -> int:
        """Wait until ``text`` is on the screen past offset ``after``; return where it ends."""
        deadline = time.monotonic() + timeout
        while (at := self.screen.find(text, after)) < 0:
            assert time.monotonic() < deadline and self._read(0.1), (text, self.screen[-2000:])
        return at + len(text)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait(self, timeout: float = 60) -> int:
        """The exit code, once the program ended and its last words are read (a hang fails)."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
        while select.select([self.master], [], [], 0.1)[0] and self._read(0):  # what it wrote last
            pass
        os.close(self.master)
        assert self.proc.wait(timeout=5) >= 0, ("still running", self.screen[-2000:])
        return self.proc.returncode


def test_generate_file_on_a_terminal_writes_its_rows_to_redirected_stdout(tmp_path):
    """`mosaic generate --file p.jsonl > out.jsonl` at a terminal: the progress bar (on the terminal)
    took stdout over while it showed, so every row went to the screen and out.jsonl stayed empty."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "question {i}"}}\n' for i in range(6)))
    with open(tmp_path / "out.jsonl", "wb") as rows:
        term = Terminal(
            "generate", "--model", "tiny-random-llama", "-f", str(prompts), "--max-new-tokens", "3",
            cache=tmp_path / "cache", stdout=rows.fileno(),
        )  # fmt: skip
        assert term.wait() == 0, term.screen
    written = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [line.split('"')[3] for line in written] == [f"question {i}" for i in range(6)]
    assert b'"prompt"' not in term.screen and b"responses" in term.screen  # the bar stays on screen


def test_ctrl_c_in_chat_stops_the_answer_and_the_session_goes_on(tmp_path):
    """Ctrl-C while the model answered ended the whole chat (exit 130, no word said), losing the
    conversation; it now stops that answer and gives the prompt back."""
    term = Terminal(
        "chat", "--model", "tiny-random-llama", "--max-new-tokens", "3000", cache=tmp_path / "cache"
    )
    term.type(b"hello\r")
    answering = term.expect(b"bot> ", after=term.expect(b"you> "))
    term.type(b"\x03")  # the terminal turns it into SIGINT, as at a shell
    stopped = term.expect(b"stopped", after=answering)
    term.expect(b"you> ", after=stopped)
    term.type(b"/quit\r")
    assert term.wait() == 0, term.screen


def test_leaving_chat_with_ctrl_d_or_ctrl_c_ends_the_line(tmp_path):
    """Ctrl-D or Ctrl-C at the prompt left the cursor after 'you> ', so the shell's prompt was
    printed on the same line."""
    for key in (b"\x04", b"\x03"):
        term = Terminal("chat", "--model", "tiny-random-llama", cache=tmp_path / "cache")
        term.expect(b"you> ")
        time.sleep(0.5)  # a SIGINT between the prompt and the read waits for a line: a person is slower
        term.type(key)
        assert term.wait() == 0, term.screen
        assert term.screen.endswith(b"\n"), (key, term.screen)


def test_mosaic_progress_0_turns_off_the_judges_progress_bar(tmp_path):
    """`judges validate` drew its bar on the terminal whatever MOSAIC_PROGRESS said."""
    screens = {}
    for setting in ("1", "0"):
        term = Terminal(
            "judges", "validate", "-j", "phrase", "--limit", "400",
            cache=tmp_path / "cache", env={"MOSAIC_PROGRESS": setting},
        )  # fmt: skip
        assert term.wait() == 0, term.screen
        screens[setting] = term.screen
    assert b"Refusal judges vs human labels" in screens["0"]  # the results table
    hide_cursor = b"\x1b[?25l"  # what a live bar does first on a terminal, whatever it then shows
    assert hide_cursor in screens["1"] and hide_cursor not in screens["0"], screens
