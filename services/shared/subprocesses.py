"""Helpers for child processes that must not outlive the process that started them."""

import contextlib
import ctypes
import signal
import subprocess

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies; a no-op elsewhere.

    Meant as `preexec_fn` of `subprocess.Popen`, so a runner killed without cleaning up still takes
    its children down with it. Linux sends the signal when the thread that started the child exits,
    not the process, so start children from a long-lived thread.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process(
    process: "subprocess.Popen[bytes]", timeout: float, *, stop_signal: int = signal.SIGTERM
) -> bool:
    """Send `stop_signal` to `process` and wait up to `timeout` seconds, then kill it.

    Returns True when the process had to be killed. A process that already exited is left as is.
    """
    if process.poll() is not None:
        return False
    process.send_signal(stop_signal)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False
