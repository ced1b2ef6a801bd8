"""Progress bars: redrawn on a terminal, plain lines (no carriage returns) in a file or a pipe."""

import io
import os

import shards.progress as progress
from shards.progress import Progress


def run_bar(file, steps=5, **kwargs):
    with Progress(total=steps, desc="extract", unit="video", file=file, **kwargs) as bar:
        for i in range(steps):
            bar.update(1)
            bar.set_postfix_str(f"{i} MB")  # redraws at once on a terminal


def test_off_a_terminal_a_line_every_so_often_and_one_at_the_end(monkeypatch):
    log = io.StringIO()
    run_bar(log)
    lines = log.getvalue().splitlines(keepends=True)
    assert "\r" not in log.getvalue() and len(lines) == 1  # 5 quick steps: only the final state
    assert lines[0].startswith("extract: 100%") and "5/5" in lines[0] and lines[0].endswith("4 MB]\n")
    monkeypatch.setattr(progress, "LOG_EVERY", 0.0)  # every change is due
    log = io.StringIO()
    run_bar(log, steps=3)
    assert [line.split("|")[-1].split()[0] for line in log.getvalue().splitlines()] == ["1/3", "2/3", "3/3"]
    assert "\r" not in log.getvalue()
    log = io.StringIO()
    run_bar(log, disable=True)  # -q
    assert log.getvalue() == ""


def test_on_a_terminal_the_bar_is_redrawn():
    reader, writer = os.openpty()
    with os.fdopen(writer, "w") as tty:
        run_bar(tty, leave=False, mininterval=0, miniters=1)  # every update drawn, however busy the machine
    chunks = []
    while True:  # a pty hands its output over in pieces; EIO once the writing side is closed and drained
        try:
            chunk = os.read(reader, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(reader)
    text = b"".join(chunks).decode()
    assert text.count("\r") >= 5 and "5/5" in text
