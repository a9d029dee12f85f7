"""Ctrl-C on `attnflow batch` (issue 23, point 8): the terminal sends SIGINT to the whole process group, worker
processes included; the run prints one line (no worker tracebacks), exits 130, and the same command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_the_run_resumes(tmp_path):
    lines = [json.dumps({"id": f"e{i}", "text": f"The keys to cabinet number {i} are on the table near the door."})
             for i in range(16)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "attnflow.cli", "batch", str(path), "--out", str(out), "--methods", "rollout,flow",
               "--batch-size", "1", "--workers", "2", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL), os.setpgrp()))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any((out / "examples").glob("*.safetensors")):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what a Ctrl-C at the terminal does: the whole foreground group
    _, err = process.communicate(timeout=180)
    assert process.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [
        "attnflow: interrupted; the examples written so far are kept: run the same command to resume."], err[-3000:]
    written = len(list((out / "examples").glob("*.safetensors")))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{16 - written} done, {written} skipped" in done.stdout
