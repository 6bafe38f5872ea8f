"""A process's identity on its machine, "<boot id>/<pid namespace>/<pid>/<start time>", that
another process of the same boot and pid namespace can check: whether a worker that advertised
it still runs, without waiting for its etcd lease to run out (routing/starting.py). Elsewhere
(another machine or container) the check cannot tell, and says so."""

from __future__ import annotations

import os


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _boot() -> str:
    return _read("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """When ``pid`` started (clock ticks since boot); "" if it does not run (an exited child
    not yet reaped, a zombie, does not)."""
    return _ticks_of(_read(f"/proc/{pid}/stat"))


def _ticks_of(stat: str) -> str:
    """``_start_ticks`` of a process's /proc/<pid>/stat text."""
    fields = stat.rpartition(")")[2].split()  # NOTE: the name in (...) may hold spaces
    if len(fields) < 20 or fields[0] == "Z":
        return ""
    return fields[19]  # field 22 of proc(5); fields[0] is field 3


def identity(pid: int | None = None) -> str:
    """The identity of process ``pid`` (this one by default); "" without /proc."""
    pid = os.getpid() if pid is None else pid
    parts = (_boot(), _pid_namespace(), _start_ticks(pid))
    return "/".join((parts[0], parts[1], str(pid), parts[2])) if all(parts) else ""


def gone(ident: str) -> bool | None:
    """True: the process ``ident`` names has exited (its pid runs no more, or runs another
    process); False: it runs; None: not checkable from here (another boot or pid namespace,
    no /proc, another user's process hidden by hidepid, an empty or malformed identity)."""
    parts = ident.split("/")
    if len(parts) != 4 or not parts[2].isdigit() or not all(parts):
        return None
    boot, namespace, pid, start = parts
    if boot != _boot() or namespace != _pid_namespace():
        return None
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        return _ticks_of(stat) != start
    # NOTE: another user's /proc/<pid> is unreadable or invisible where /proc is mounted with
    # hidepid (systemd's ProtectProc=): that read as exited. The kernel still says whether
    # the pid runs; then its start time cannot be compared.
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return None
