"""`python tests/service/fake_server.py`: the real server (service.edge.server) with the fake engine, in its own
process, for tests that send it signals or starve it of file descriptors. Settings from TIUE_* variables.

Prints `port N` on stdout once ready (after `--leave-fds`: once only that many descriptors are free),
then `device N` as each batch of N images reaches the fake device; logs go to stderr. `--hold` keeps
the fake device busy until the server has exited.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))

from fakes import FakeEngine  # noqa: E402

from service.app import create_app  # noqa: E402
from service.edge.server import build_server  # noqa: E402
from service.settings import Settings  # noqa: E402


def occupy_all_but(free: int) -> list[int]:
    """Open /dev/null until the process is out of descriptors, then give `free` of them back."""
    held: list[int] = []
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            break
    for _ in range(free):
        os.close(held.pop())
    return held


def report_batches(engine: FakeEngine) -> None:
    while True:
        print(f"device {len(engine.entered.get())}", flush=True)


async def main(args: argparse.Namespace) -> None:
    engine = FakeEngine()
    if args.hold:
        engine.gate.clear()
    app = create_app(Settings(), pipeline_factory=lambda: engine)
    server = build_server(app, app.state.tiue.settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    await asyncio.wait_for(app.state.tiue.ready.wait(), 30)
    held = occupy_all_but(args.leave_fds) if args.leave_fds is not None else []
    print(f"port {sock.getsockname()[1]}", flush=True)
    threading.Thread(target=report_batches, args=(engine,), daemon=True).start()
    try:
        await serving
    finally:
        engine.gate.set()  # the device thread is not a daemon: let it finish so the process can exit
        for fd in held:
            os.close(fd)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", action="store_true", help="the fake device holds the first batch")
    parser.add_argument("--open-files", type=int, help="the open-file limit (soft and hard)")
    parser.add_argument("--leave-fds", type=int, help="occupy all descriptors but this many once ready")
    args = parser.parse_args()
    if args.open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.open_files, args.open_files))
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(args))
