"""dtrain.process: a command's process ends fast (its objects frozen out of the final collections) and still
ends cleanly: the exit code passes through, buffered files are written, atexit handlers run."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, env_for_subprocess


def test_exit_with_keeps_the_code_the_files_and_the_atexit_handlers(tmp_path):
    out, flag = tmp_path / "buffered.txt", tmp_path / "atexit.txt"
    code = (
        "import atexit, pathlib\n"
        f"atexit.register(lambda: pathlib.Path({str(flag)!r}).write_text('ran'))\n"
        f"held = open({str(out)!r}, 'w'); held.write('x' * 100)  # buffered, never closed by hand\n"
        "from dtrain.process import exit_with\n"
        "exit_with(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env_for_subprocess(), timeout=60)
    assert proc.returncode == 3
    assert out.read_text() == "x" * 100 and flag.read_text() == "ran"
