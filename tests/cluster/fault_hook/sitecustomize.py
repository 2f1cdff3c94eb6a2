"""Fault injection for tests: put this folder on PYTHONPATH and every Python process imports it at start-up.

It does nothing unless SPARSESCALE_FAULT is set. Result files are written by `sparsescale.io` to a temporary
sibling and renamed into place with `os.replace`, so wrapping `os.replace` lets a test strike at an exact
point of any process, however deep in a workflow (a training job run by Snakemake, locally or under SLURM):

    SPARSESCALE_FAULT="<when>:<glob>:<action>"   e.g. "after:step_00000001.pt.sha256:stop"
      when    after   right after a file whose name matches <glob> was renamed into place
              during  instead of renaming it: the temporary file is cut to half its size first (a writer
                      killed mid-write), then <action>
      action  kill    SIGKILL this process (no clean-up runs, as with the OOM killer or scancel -s KILL)
              stop    SIGSTOP this process, so that the test can kill it from outside when it chooses
    SPARSESCALE_FAULT_MARKER=PATH   fire once: only the process that creates PATH (exclusively) strikes,
                                    and it writes its PID there first
"""

import fnmatch
import os
import signal

_SPEC = os.environ.get("SPARSESCALE_FAULT")

if _SPEC:
    _when, _glob, _action = _SPEC.split(":")
    _replace = os.replace

    def _claim() -> bool:
        marker = os.environ.get("SPARSESCALE_FAULT_MARKER")
        if not marker:
            return True
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        return True

    def _strike() -> None:
        os.kill(os.getpid(), signal.SIGKILL if _action == "kill" else signal.SIGSTOP)

    def replace(src, dst, *args, **kwargs):
        hit = fnmatch.fnmatch(os.path.basename(os.fspath(dst)), _glob)
        if hit and _when == "during" and _claim():
            size = os.path.getsize(src)
            os.truncate(src, size // 2)
            _strike()
        _replace(src, dst, *args, **kwargs)
        if hit and _when == "after" and _claim():
            _strike()

    os.replace = replace
