"""Helpers for child processes that must not outlive the process that started them."""

import contextlib
import ctypes
import signal

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
