"""Runs CLI commands in forked children of one process that imported them once, killing a child with SIGKILL after a
given delay when asked: many runs and kill points without paying interpreter start-up each time.

The parent imports the CLIs and never runs torch itself, so each child starts its own thread pools after the fork.
Protocol, one JSON object per line: in, `{"command": "convert" | "tta", "argv": [...], "kill_after": seconds | null,
"wait": true | false}`; out, `{"pid": ..., "exit": code | null, "killed": bool, "seconds": ...}` (immediately with
`"wait": false`, then `{"command": "wait", "pid": ...}` collects such a run). Children's output goes to `LOG`.
"""

import json
import os
import signal
import sys
import time

from wemoe.cli.convert import main as convert_main
from wemoe.cli.tta import main as tta_main

COMMANDS = {"convert": convert_main, "tta": tta_main}


def run_child(command: str, argv: list[str], log: str) -> None:
    descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    code = 0
    try:
        COMMANDS[command](argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def wait(pid: int, started: float, kill_after: float | None) -> dict:
    killed = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if kill_after is not None and time.monotonic() - started >= kill_after:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed = True
            break
        time.sleep(0.002)
    code = os.waitstatus_to_exitcode(status)
    return {"pid": pid, "exit": None if killed else code, "killed": killed, "seconds": time.monotonic() - started}


def main() -> None:
    log = os.environ["LOG"]
    running = {}
    for line in sys.stdin:
        request = json.loads(line)
        if request["command"] == "wait":
            pid = request["pid"]
            reply = wait(pid, running.pop(pid), None)
        else:
            started = time.monotonic()
            pid = os.fork()
            if pid == 0:
                run_child(request["command"], request["argv"], log)
            if request.get("wait", True):
                reply = wait(pid, started, request.get("kill_after"))
            else:
                running[pid] = started
                reply = {"pid": pid}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
