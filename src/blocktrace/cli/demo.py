"""``blocktrace demo``: the main job end to end, on a built-in default.

It does what a new user would do by hand, with the same commands and the same real clients:
make a sample disk, serve it over NBD with a trace to a dm-log-writes log, write to it with
qemu-io (data, FUA, zeroes, discard, flush) and read its allocation map with nbdinfo, stop the
server, then replay the log onto an empty disk and verify the replay equals the served image.
Every step is a subprocess, so the demo exercises exactly what the README promises.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from blocktrace.errors import BlocktraceError, UsageError

MiB = 1024 * 1024
DISK_SIZE = 64 * MiB

#: The client workload: (description, qemu-io command).
WORKLOAD = [
    ("write 1 MiB of 0xab at 0", "write -P 0xab 0 1M"),
    ("write 64 KiB of 0xcd at 4 MiB with FUA", "write -f -P 0xcd 4M 64k"),
    ("flush", "flush"),
    ("zero 256 KiB at 512 KiB", "write -z 512k 256k"),
    ("discard 1 MiB at 8 MiB", "discard 8M 1M"),
    ("overwrite 4 KiB of 0xef at 4 MiB", "write -P 0xef 4M 4k"),
    ("flush", "flush"),
]


def _self() -> list[str]:
    return [sys.executable, "-m", "blocktrace"]


def _run(console: Console, cmd: list[str], *, show: bool = True) -> str:
    if show:
        console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise BlocktraceError(f"{Path(cmd[0]).name} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise BlocktraceError(f"server exited early: {err.strip()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(os.fspath(path))
                return
            except OSError:
                time.sleep(0.05)
    raise BlocktraceError(f"server did not listen on {path}")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path), default="demo")
def demo(directory: Path) -> None:
    """Serve a sample disk, trace real client writes, replay the log and verify it."""
    console = Console(stderr=False, highlight=False)
    for tool in ("qemu-io", "nbdinfo"):
        if shutil.which(tool) is None:
            raise UsageError(f"{tool} is not installed; run scripts/setup.sh first")
    directory.mkdir(parents=True, exist_ok=True)
    disk, log, replayed = directory / "disk.img", directory / "disk.log", directory / "replay.img"
    sock = directory / "blocktrace.sock"
    for p in (disk, log, replayed, sock):
        p.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    console.rule("[bold]1. serve a 64 MiB disk over NBD, tracing every write to a log")
    cmd = [
        *_self(),
        "serve",
        os.fspath(disk),
        "--socket",
        os.fspath(sock),
        "--trace",
        f"disk=log:{log}",
    ]
    console.print(f"[dim]$ {' '.join(cmd)} &[/dim]")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_socket(sock, server)
        uri = f"nbd+unix:///disk?socket={sock}"
        console.rule("[bold]2. a real client (qemu-io over NBD) writes to it")
        # qemu-io's default cache mode is writethrough, which makes every write FUA; with
        # writeback only the write given -f carries FUA, as the workload says.
        args = ["qemu-io", "-f", "raw", "-t", "writeback"]
        for _, c in WORKLOAD:
            args += ["-c", c]
        _run(console, [*args, uri])
        for what, _ in WORKLOAD:
            console.print(f"  - {what}")
        console.rule("[bold]3. nbdinfo --map: what the disk holds now")
        console.print(_run(console, ["nbdinfo", "--map", uri]).rstrip())
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    if server.returncode != 0:
        err = server.stderr.read().decode() if server.stderr else ""
        raise BlocktraceError(f"server exited {server.returncode}: {err.strip()}")
    console.rule("[bold]4. the recorded write stream")
    console.print(_run(console, [*_self(), "log", "list", os.fspath(log)]).rstrip())
    console.rule("[bold]5. replay the log onto an empty disk and verify it equals the original")
    with open(replayed, "wb") as f:
        f.truncate(DISK_SIZE)
    _run(console, [*_self(), "replay", os.fspath(log), os.fspath(replayed)])
    result = subprocess.run(
        [*_self(), "verify", os.fspath(disk), os.fspath(replayed)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console.print(f"[dim]$ blocktrace verify {disk} {replayed}[/dim]")
    console.print(result.stdout.rstrip())
    table = Table(title="blocktrace demo", show_header=False)
    table.add_row("served image", os.fspath(disk))
    table.add_row("trace log (dm-log-writes)", os.fspath(log))
    table.add_row("replayed image", os.fspath(replayed))
    table.add_row(
        "replay == image", "[green]yes[/green]" if result.returncode == 0 else "[red]NO[/red]"
    )
    console.print(table)
    if result.returncode != 0:
        raise BlocktraceError("replayed image differs from the served image")
