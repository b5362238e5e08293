"""The reaper of a local Ray instance: ends the instance's processes and removes its folder once the driver is gone.

:func:`w2s_agents.rollout.ray.ray_session` starts this file as a script (standard library only, so it starts in
a fraction of a second and imports neither this package nor Ray), in a session of its own so that a Ctrl-C in
the driver's terminal does not reach it::

    python -I -S reaper.py TOKEN DRIVER_PID [TEMP_DIR]

Its standard input is a pipe whose only writer is the driver (the process ``DRIVER_PID``). Once Ray has started,
the driver writes the instance's session folder on it, one line. The read returns at end of file the moment
the driver closes the pipe after its own shutdown, or the moment the driver dies, however it dies (SIGKILL
included). Then every process of the instance is killed with SIGKILL, and ``TEMP_DIR``, when given, is removed.

A process belongs to the instance when (Linux ``/proc``; never the driver or this process):

- its environment holds ``W2S_RAY_SESSION=TOKEN``: the driver sets that variable while ``ray.init`` starts the
  instance, so the GCS, the raylet and Ray's monitors have it, and so does anything a worker starts; or
- its command line starts with ``ray::`` (a Ray worker or agent, which rewrites its command line and with it
  the environment that ``/proc`` shows) and it has a file open in the session folder (its logs).

Without this, the raylet and the GCS end with the driver (Ray asks the kernel for that on Linux) but Ray's
dashboard and runtime-env agents ran on for a minute or two and the temporary folder stayed.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time

ENV_VAR = "W2S_RAY_SESSION"
"""The environment variable that marks the processes of one local Ray instance (its value is the token)."""

KILL_ROUNDS_S = 5.0
"""How long the reaper keeps finding and killing processes of the instance (new ones may appear meanwhile)."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _has_file_under(pid: str, root: str) -> bool:
    """Whether process ``pid`` has a file open under the folder ``root``."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    prefix = root.rstrip("/") + "/"
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def session_pids(token: str, session_dir: str | None, keep: set[int]) -> list[int]:
    """Pids of the live processes of the instance (see the module's docstring), except those in ``keep``.

    Processes that cannot be read (another user's, gone meanwhile, zombies) are not listed.
    """
    entry = f"\0{ENV_VAR}={token}\0".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in keep:
            continue
        marked = entry in b"\0" + _read(f"/proc/{name}/environ")
        if marked or (
            session_dir is not None
            and _read(f"/proc/{name}/cmdline").startswith(b"ray::")
            and _has_file_under(name, session_dir)
        ):
            found.append(int(name))
    return found


def reap(token: str, session_dir: str | None, temp_dir: str | None, keep: set[int]) -> int:
    """Kill every process of the instance with SIGKILL, then remove ``temp_dir``; return how many were killed."""
    keep = keep | {os.getpid()}
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_ROUNDS_S
    while True:
        pids = session_pids(token, session_dir, keep)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                continue
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if temp_dir:
        for _ in range(3):  # a process that was writing into it may have been killed mid-write
            shutil.rmtree(temp_dir, ignore_errors=True)
            if not os.path.exists(temp_dir):
                break
            time.sleep(0.1)
    return len(killed)


def main(argv: list[str] | None = None) -> int:
    """Read the session folder from standard input until end of file, then :func:`reap`; returns the exit
    status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3) or not args[0] or not args[1].isdigit():
        sys.stderr.write("usage: reaper.py TOKEN DRIVER_PID [TEMP_DIR]\n")  # started by rollout/ray.py only
        return 2
    token, driver, temp_dir = args[0], int(args[1]), (args[2] if len(args) == 3 else None)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    received = b""
    while True:
        try:
            chunk = os.read(0, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    lines = [line for line in received.decode(errors="replace").splitlines() if line.strip()]
    session_dir = lines[-1].strip() if lines else temp_dir
    reap(token, session_dir, temp_dir, {driver})
    return 0


if __name__ == "__main__":
    sys.exit(main())
