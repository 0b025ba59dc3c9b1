"""Run generated Python in a separate, limited process: the executor behind pass@k.

What it guarantees (enforced by the kernel):

- a separate process (`python -I -S`: no environment variables read, no user or site
  packages), in its own session, killed with its whole process group at a wall-clock timeout;
- resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS), size of any file it
  writes (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps, and for a non-root user
  RLIMIT_NPROC 1 (no new processes; Linux does not apply RLIMIT_NPROC to root);
- a fresh temporary working directory, deleted afterwards, and a scrubbed environment
  (PATH, HOME and TMPDIR pointing into that directory, LANG);
- no network where the kernel lets an unprivileged process unshare its network namespace
  (root: CLONE_NEWNET; others: CLONE_NEWUSER | CLONE_NEWNET): only a down loopback exists
  there. `SandboxResult.isolated_network` says whether this happened.

What it adds inside the interpreter (a `sys.addaudithook` hook, installed before the code
runs): opening, listing or changing into any path outside the working directory and the
standard library fails, and so do creating sockets, starting processes (fork, exec, spawn,
subprocess, os.system), signalling other processes, and loading ctypes or native modules.
This stops generated code that naively reads ~/.ssh, calls a URL or forks, but Python's
audit hooks are not a security boundary against code written to escape them.

What it does not do: it is not a VM or a container. It does not hide the file system from
the kernel (a process as root could read what root reads, were the hook bypassed), limit
the host's CPU share, or stop `os.stat` of outside paths. Run untrusted model output at
scale in a real isolation layer (a VM, gVisor, a locked-down container).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Runs in the sandboxed interpreter: applies the limits, installs the hook, runs the program.
# It is passed with `-c`, so it reads nothing from the host but the standard library.
_LAUNCHER = r'''
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
net = False
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    flags = 0x40000000 if os.geteuid() == 0 else 0x10000000 | 0x40000000  # CLONE_NEWNET [| CLONE_NEWUSER]
    net = libc.unshare(flags) == 0
    del ctypes, libc
except Exception:
    pass
for name, value in cfg["limits"].items():
    if name == "NPROC" and os.geteuid() == 0:
        continue
    limit = getattr(resource, "RLIMIT_" + name)
    resource.setrlimit(limit, (value, value))
sys.stderr.write("SANDBOX_NET=%d\n" % net)
sys.stderr.flush()
sys.modules.pop("ctypes", None)
sys.modules.pop("_ctypes", None)
home = os.path.realpath(cfg["dir"])
readable = tuple(os.path.realpath(p) for p in cfg["readable"])
pid = os.getpid()
BLOCKED = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
           "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "os.setsid" }
NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "_socket", "socket", "subprocess", "multiprocessing", "pty"}
def inside(path, extra=()):
    try:
        path = os.path.realpath(os.fsdecode(path) if not isinstance(path, int) else "")
    except Exception:
        return False
    return path == home or path.startswith(home + os.sep) or any(
        path == r or path.startswith(r + os.sep) for r in extra)
def hook(event, args):
    if event in BLOCKED:
        raise PermissionError("sandbox: %s is not allowed" % event)
    if event == "import" and args[0].split(".")[0] in NO_IMPORT:
        raise PermissionError("sandbox: importing %s is not allowed" % args[0])
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:  # os.open: the flags say
            writing = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC))
        if not inside(path, () if writing else readable):
            raise PermissionError("sandbox: %s is outside the sandbox" % os.fsdecode(path))
    elif event in ("os.listdir", "os.scandir"):
        if args and not isinstance(args[0], int) and not inside(args[0] if args[0] is not None else ".", readable):
            raise PermissionError("sandbox: %s of a path outside the sandbox" % event)
    elif event in ("os.chdir", "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
                   "os.symlink", "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile", "os.truncate",
                   "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr"):
        # Changes (and entering a directory) only inside: both paths of a rename or link, the
        # target of a symlink too (a link to an outside file would open as an inside one).
        paths = [a for a in args[:2] if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__")]
        if any(not inside(a) for a in paths):
            raise PermissionError("sandbox: %s of a path outside the sandbox" % event)
    elif event in ("os.kill", "os.killpg") and args[0] not in (pid, 0):
        raise PermissionError("sandbox: signalling another process is not allowed")
source = open(cfg["program"], encoding="utf-8").read()
code = compile(source, "program.py", "exec")
if cfg["audit_hook"]:
    sys.addaudithook(hook)
del hook
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxResult:
    status: str  # "passed", "failed" (non-zero exit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolated_network: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _stdlib_dirs() -> list[str]:
    import sysconfig

    paths = sysconfig.get_paths()
    return sorted({paths["stdlib"], paths["platstdlib"], os.path.join(sys.base_prefix, "lib")})


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024, cpu_s: int | None = None,
               max_file_mb: int = 16, max_output: int = 8192, audit_hook: bool = True) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; passed means exit status 0 in time.
    `audit_hook=False` leaves only the kernel's limits (to measure what they hold alone)."""
    workdir = tempfile.mkdtemp(prefix="lmforge-sandbox-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        limits = {"CPU": int(cpu_s or max(1, round(timeout)) + 1), "AS": memory_mb << 20, "FSIZE": max_file_mb << 20,
                  "NOFILE": 64, "CORE": 0, "NPROC": 1}
        cfg = json.dumps({"dir": workdir, "program": path, "limits": limits, "readable": _stdlib_dirs(),
                          "audit_hook": audit_hook})
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8"}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, cfg], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            status = "timeout"
        _kill_group(proc)  # anything it left behind in its group
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    err_text = err.decode("utf-8", "replace")
    first, _, rest = err_text.partition("\n")
    net = first == "SANDBOX_NET=1"
    if first.startswith("SANDBOX_NET="):
        err_text = rest
    return SandboxResult(status, proc.returncode, out.decode("utf-8", "replace")[-max_output:],
                         err_text[-max_output:], seconds, net)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_many(programs: list[str], workers: int | None = None, **limits) -> list[SandboxResult]:
    """Run programs in parallel sandboxes (threads only wait on the processes); results in order."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_python(p, **limits), programs))
