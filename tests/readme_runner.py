"""Run the command blocks of README.md (and the docs quick starts) as written, in a fresh copy of the repo.

A command block is a fenced block marked ```bash. An HTML comment right above the fence marks a block that is
not run here: ``<!-- readme-test: setup ... -->`` (the set-up lines: .ci/run runs them, and the test checks
they are there) or ``<!-- readme-test: skip ... -->`` (the test suite itself). Every other bash block runs,
line by line (a trailing backslash continues a line), in ONE bash shell, so ``export`` lines carry on; the
working directory is the root of a copy of the repository made from ``git ls-files`` (tracked and untracked,
not ignored files: what a fresh clone plus your edits holds), so nothing of this checkout is touched.

As a script, for timing the real (not quick) commands on a quiet machine:

    python tests/readme_runner.py --full       # drops `export EDGE_INSPECT_QUICK=1`; takes days (see README)
    python tests/readme_runner.py              # quick, as CI runs it; prints seconds per command
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/demo.md")  # the files whose command blocks run
QUICK_LINE = "export EDGE_INSPECT_QUICK=1"
FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"<!--\s*readme-test:\s*(\w+)")


@dataclass(frozen=True)
class Block:
    source: str  # file it comes from
    line: int  # 1-based line of the opening fence
    lang: str
    mark: str | None  # setup | skip | None
    lines: tuple[str, ...]  # raw lines between the fences

    @property
    def commands(self) -> list[str]:
        """Command lines, continuations joined; blank lines and whole-line comments left out."""
        out, pending = [], ""
        for raw in self.lines:
            text = pending + raw.rstrip()
            if text.endswith("\\"):
                pending = text[:-1] + " "
                continue
            pending = ""
            if text.strip() and not text.lstrip().startswith("#"):
                out.append(text.strip())
        return out


def blocks(path: Path, source: str | None = None) -> list[Block]:
    """Every fenced block of a markdown file, with the readme-test mark of the line above it."""
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = MARK.search(prev)
        found.append(Block(source or path.name, i + 1, m.group(1), mark.group(1) if mark else None,
                           tuple(lines[i + 1:j])))
        i = j + 1
    return found


def command_blocks(root: Path = ROOT) -> list[Block]:
    return [b for doc in DOCS for b in blocks(root / doc, doc) if b.lang == "bash"]


def runnable(root: Path = ROOT, full: bool = False) -> list[tuple[Block, str]]:
    """(block, command) in order, without the setup and skip blocks; ``full`` drops the quick switch."""
    out = []
    for block in command_blocks(root):
        if block.mark in ("setup", "skip"):
            continue
        out += [(block, c) for c in block.commands if not (full and c == QUICK_LINE)]
    return out


IGNORED = (".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis",
           "*.egg-info", "build")


def fresh_copy(dest: Path, root: Path = ROOT) -> Path:
    """The repository's files as a clone would have them (plus uncommitted edits), without build outputs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=root, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive)
        shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*IGNORED))
        return dest
    for rel in filter(None, listed):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def script(commands: list[str]) -> str:
    """One bash script: each command on its own lines between markers with its exit code and times."""
    parts = ["#!/usr/bin/env bash", "set -o pipefail"]
    for i, command in enumerate(commands):
        parts += [f"echo '::readme-cmd {i}::' >&2", "__t0=$(date +%s.%N)", command, "__rc=$?",
                  f"echo \"::readme-done {i} $__rc $__t0 $(date +%s.%N)::\" >&2",
                  'if [ "$__rc" -ne 0 ]; then exit "$__rc"; fi']
    return "\n".join(parts) + "\n"


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str
    seconds: dict[int, float]  # command index -> wall seconds
    codes: dict[int, int]


def run_commands(commands: list[str], workdir: Path, env: dict, timeout_s: float,
                 echo: bool = False) -> Result:
    """Run the commands in one bash shell in ``workdir`` (killed after ``timeout_s``: exit code -9);
    ``echo`` prints the output as it comes."""
    path = workdir.parent / "readme.sh"
    path.write_text(script(commands))
    proc = subprocess.Popen(["bash", str(path)], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = "".join(lines)
    seconds, codes = {}, {}
    for m in re.finditer(r"::readme-done (\d+) (-?\d+) ([\d.]+) ([\d.]+)::", output):
        i = int(m.group(1))
        codes[i], seconds[i] = int(m.group(2)), float(m.group(4)) - float(m.group(3))
    return Result(proc.returncode, output, seconds, codes)


def cpu_line() -> str:
    """CPU model and the vector ISA features, printed beside every timing figure."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in reversed(info.splitlines()) if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model, flags = fields.get("model name", "unknown CPU"), fields.get("flags", "").split()
    isa = [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} logical CPUs, {' '.join(isa) or 'no AVX'}"


def command_env(tmpdir: Path) -> dict:
    """This interpreter's bin first on PATH (so `python` and the edge-* scripts are this install), a private
    TMPDIR, and no quick switch from outside (the README sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "EDGE_INSPECT_QUICK"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["TMPDIR"] = str(tmpdir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="without the quick switch (real sizes: days)")
    p.add_argument("--keep", action="store_true", help="keep the copy of the repository and print its path")
    args = p.parse_args(argv)
    steps = runnable(full=args.full)
    base = Path(tempfile.mkdtemp(prefix="readme-", dir="/tmp"))  # short: the daemon's unix sockets live below
    (base / "tmp").mkdir()
    repo = fresh_copy(base / "repo")
    started = time.perf_counter()
    result = run_commands([c for _, c in steps], repo, command_env(base / "tmp"), timeout_s=7 * 24 * 3600,
                          echo=True)
    for i, (block, command) in enumerate(steps):
        took = result.seconds.get(i)
        print(f"{'-' if took is None else f'{took:7.1f} s'}  rc {result.codes.get(i, '-')}  "
              f"{block.source}:{block.line}  {command}")
    print(f"total {time.perf_counter() - started:.0f} s, exit {result.returncode}; {cpu_line()}")
    if args.keep:
        print(f"copy kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
