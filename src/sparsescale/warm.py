"""Warm start: `sparsescale train` forked from a process that has already imported torch and transformers.

A sweep's run pays ~9 s of interpreter start and imports before its first step (the `startup` phase in
final.json: 8.6 s a run in the reference sweep, more than the steps of a d1 run at 1M tokens take in a fifth).
With `sparsescale train --warm-start` (what config `train.warm_start` adds to every run's command; or
SPARSESCALE_WARM=1), the `sparsescale train` process becomes a thin client:

- it connects to a server on a Unix socket (started on first use, detached, gone after `SPARSESCALE_WARM_IDLE`
  seconds without a request, default 120) and sends its argv, working directory, environment and umask, and
  its stdin/stdout/stderr themselves (SCM_RIGHTS), so the run writes to the job's own log;
- the server forks; the child takes over those, runs `sparsescale train` exactly as the command line would
  and sends back its exit code, which the client exits with. The server never runs a torch operation, so the
  fork copies no thread pool and no CUDA context;
- SIGINT/SIGTERM to the client are passed to the child, and a child whose client is gone (SIGKILL) stops
  itself: Snakemake's cancel still cancels the run;
- the server is keyed by the interpreter, the package's source files and the environment variables read at
  import time (threads, numba, CUDA, HF...): code or settings that changed get a new server, never a stale one;
- a run's `startup` (wall and CPU) counts from the client's start, so final.json's cost stays honest.

If no server can be reached or started, the client says so and runs the training in its own process. The
Snakemake benchmark files measure the client (its wall time is the run's; the child's CPU and memory are in
final.json). Several runs at once each get their own child.
"""

from __future__ import annotations

import array
import fcntl
import gc
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

from sparsescale.io import process_age

FLAG = "--warm-start"
SERVER_COMMAND = "warm-server"  # internal: `sparsescale warm-server SOCKET` (cli.main) runs `serve`
ENV_FLAG = "SPARSESCALE_WARM"
CHILD_FLAG = "SPARSESCALE_WARM_CHILD"  # set in the forked run: it runs the command, never asks the server again
IMPORT_TIME_ENV = ("OMP_", "MKL_", "OPENBLAS_", "NUMBA_", "CUDA_", "TORCH", "PYTORCH_", "HF_", "TRANSFORMERS_",
                   "TOKENIZERS_", "PYTHON", "LD_", "KMP_", "SPARSESCALE_")
"""Prefixes of the environment variables that may take effect when torch/numba/transformers (or a
sitecustomize on PYTHONPATH, like the tests' fault hook) are imported: the server's key includes them, so a
client with other values gets its own server."""
_PER_RUN_ENV = (ENV_FLAG, CHILD_FLAG, "SPARSESCALE_WARM_DIR", "SPARSESCALE_WARM_IDLE", "SPARSESCALE_WARM_START_TIMEOUT",
                "SPARSESCALE_STARTED_AT", "SPARSESCALE_STARTUP_CPU")
MAX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with its terminating NUL
_HEADER = struct.Struct("!I")
_CODE = struct.Struct("!i")


def requested(argv: list[str]) -> bool:
    """`sparsescale train --warm-start` or SPARSESCALE_WARM=1, not already the forked run itself, and one
    process: a run of several (--nproc-per-node/--nnodes > 1) execs torchrun, which a fork cannot hand over."""
    if os.environ.get(CHILD_FLAG) == "1":
        return False
    for opt in ("--nproc-per-node", "--nnodes"):
        for i, arg in enumerate(argv):
            value = arg.split("=", 1)[1] if arg.startswith(opt + "=") else (
                argv[i + 1] if arg == opt and i + 1 < len(argv) else None)
            if value is not None and value != "1":
                return False
    return FLAG in argv or os.environ.get(ENV_FLAG, "0").lower() in ("1", "true", "yes")


def _socket_dir() -> Path:
    base = os.environ.get("SPARSESCALE_WARM_DIR") or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"sparsescale-warm-{os.getuid()}"


def server_key() -> str:
    """What the server's imported state depends on: interpreter, package sources, import-time environment."""
    h = hashlib.sha256(sys.executable.encode())
    pkg = Path(__file__).resolve().parent
    for path in sorted(pkg.rglob("*.py")):
        st = path.stat()
        h.update(f"{path.relative_to(pkg)}:{st.st_size}:{st.st_mtime_ns}".encode())
    for name in sorted(os.environ):
        if name.startswith(IMPORT_TIME_ENV) and name not in _PER_RUN_ENV:
            h.update(f"{name}={os.environ[name]}".encode())
    h.update(str(sys.path).encode())
    return h.hexdigest()[:16]


def socket_path() -> Path:
    return _socket_dir() / f"{server_key()}.sock"


def _send_msg(conn: socket.socket, payload: bytes, fds: list[int] | None = None) -> None:
    data = _HEADER.pack(len(payload)) + payload
    if fds:
        conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        conn.sendall(data)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


# ----------------------------------------------------------------------------------------------------------
# client

def _process_start_epoch() -> float:
    """Wall-clock time at which this process started (Linux /proc; elsewhere: now)."""
    return time.time() - (process_age() or 0.0)


def _connect(path: Path, timeout: float, server: subprocess.Popen | None = None) -> socket.socket | None:
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() >= deadline or (server is not None and server.poll() is not None):
                return None
            time.sleep(0.05)


def _start_server(path: Path) -> subprocess.Popen:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(path.with_suffix(".log"), "ab") as log:  # the server's own messages (a failed start says why here)
        return subprocess.Popen([sys.executable, "-m", "sparsescale", SERVER_COMMAND, str(path)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True)


def run_client(command: str, argv: list[str]) -> int | None:
    """Run `sparsescale <command> argv` in a child of the warm server; None: no server, run it here."""
    path = socket_path()
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        print(f"sparsescale: warm start: the socket path {path} is longer than {MAX_SOCKET_PATH} bytes (the limit "
              "of a Unix socket): set SPARSESCALE_WARM_DIR to a shorter folder; running in this process",
              file=sys.stderr)
        return None
    try:
        conn = _connect(path, 0.0)
        if conn is None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(path.parent / "start.lock", "w") as lock:  # jobs that start together start one server
                fcntl.flock(lock, fcntl.LOCK_EX)
                conn = _connect(path, 0.0)
                if conn is None:
                    server = _start_server(path)
                    conn = _connect(path, float(os.environ.get("SPARSESCALE_WARM_START_TIMEOUT", "120")), server)
    except OSError as err:  # the socket folder cannot be made or written: the run goes on without a server
        print(f"sparsescale: warm start: {err} (set SPARSESCALE_WARM_DIR to a writable folder); running in this "
              "process", file=sys.stderr)
        return None
    if conn is None:
        print(f"sparsescale: warm start: no server at {path} (its log: {path.with_suffix('.log')}); running in "
              "this process", file=sys.stderr)
        return None
    os.umask(umask := os.umask(0o022))
    request = {"command": command, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
               "started_at": _process_start_epoch(), "client_cpu": time.process_time()}
    with conn:
        try:
            _send_msg(conn, json.dumps(request).encode(), fds=[0, 1, 2])
            pid = _CODE.unpack(_recv_exact(conn, _CODE.size))[0]
        except (OSError, ConnectionError) as err:  # the server went away before forking: nothing has run yet
            print(f"sparsescale: warm start: the server at {path} did not take the run ({err}); running in this "
                  "process", file=sys.stderr)
            return None
        print(f"sparsescale: warm start: the run is pid {pid}, forked from the server at {path}", file=sys.stderr,
              flush=True)

        def forward(signum, _frame):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        try:
            return _CODE.unpack(_recv_exact(conn, _CODE.size))[0]
        except ConnectionError:
            print(f"sparsescale: warm start: the run (pid {pid}) ended without an exit code", file=sys.stderr)
            return 1


# ----------------------------------------------------------------------------------------------------------
# server

def _child(conn: socket.socket, request: dict, fds: list[int], run: Callable[[list[str]], int]) -> None:
    """In the forked child: become the client's process and run the command; never returns."""
    code = 1
    try:
        conn.sendall(_CODE.pack(os.getpid()))  # first the pid (for the client's signals), at the end the exit code
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_FLAG] = "1"  # the child is the run: it must not call the server again
        os.environ["SPARSESCALE_STARTED_AT"] = repr(request["started_at"])
        os.environ["SPARSESCALE_STARTUP_CPU"] = repr(request["client_cpu"])
        sys.argv = ["sparsescale", request["command"], *request["argv"]]

        def watchdog():  # the client is gone (killed): stop the run as its own kill would have
            try:
                while conn.recv(1):
                    pass
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGTERM)
        threading.Thread(target=watchdog, daemon=True).start()
        code = run([request["command"], *request["argv"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - the run's own traceback, as a direct run would print it
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(_CODE.pack(code))
        except (OSError, ValueError):
            pass
        os._exit(code)


def _accept(srv: socket.socket) -> tuple[socket.socket, dict, list[int]] | None:
    """One client's request and its three file descriptors; None if it sent none in time."""
    conn, _ = srv.accept()
    conn.settimeout(10.0)  # a client that connects and sends nothing does not hold up the others
    fds = array.array("i")
    try:
        msg, anc, _, _ = conn.recvmsg(_HEADER.size, socket.CMSG_SPACE(3 * fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        msg += _recv_exact(conn, _HEADER.size - len(msg)) if len(msg) < _HEADER.size else b""
        request = json.loads(_recv_exact(conn, _HEADER.unpack(msg)[0]))
    except (OSError, ConnectionError, ValueError, struct.error):
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    conn.settimeout(None)
    return conn, request, list(fds)


def serve(path: Path, run: Callable[[list[str]], int]) -> int:
    """Import the training stack once, then fork one child per request; exit after `idle` s without children.

    The server watches each client's connection: when a client goes away (killed) while its run is alive, the
    run is killed (SIGKILL: it may be stopped, and a stopped process never acts on SIGTERM).
    `run`: the CLI's dispatcher (cli.main), called in each child with the client's command line."""
    # imported here, in the server only: what every run would import, and the reason the server exists
    import sparsescale.evaluate  # noqa: F401
    import sparsescale.train  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401  (transformers' lazy import costs seconds)

    gc.collect()
    gc.freeze()  # the imported objects move to a permanent generation: the children's collections leave their
    # pages unwritten, so copy-on-write copies less of the server's memory into each run
    idle = float(os.environ.get("SPARSESCALE_WARM_IDLE", "120"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp))
    os.chmod(tmp, 0o600)
    srv.listen(64)
    os.replace(tmp, path)  # atomic: a client connects to a listening server or to none
    inode = path.stat().st_ino
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    alive: set[int] = set()  # forked runs not yet reaped (a zombie keeps its pid: no kill can hit another)
    last = time.monotonic()
    try:
        while alive or time.monotonic() - last < idle:
            for pid in list(alive):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    alive.discard(pid)
            for key, _ in sel.select(timeout=1.0):
                last = time.monotonic()
                if key.fileobj is srv:
                    got = _accept(srv)
                    if got is None:
                        continue
                    conn, request, fds = got
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        for other in sel.get_map().values():  # the other runs' connections are theirs
                            other.fileobj.close()
                        sel.close()
                        _child(conn, request, fds, run)
                    for fd in fds:
                        os.close(fd)
                    alive.add(pid)
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:  # the client sends nothing after its request: readable means it is gone
                    conn, pid = key.fileobj, key.data
                    sel.unregister(conn)
                    conn.close()
                    if pid in alive:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
    finally:
        try:
            if path.stat().st_ino == inode:  # still ours (a server started later may have replaced it)
                path.unlink()
            log = path.with_suffix(".log")
            if log.stat().st_size == 0:  # nothing went wrong: no log to keep
                log.unlink()
        except OSError:
            pass
        srv.close()
    return 0
