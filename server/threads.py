"""OS-visible thread names, so ``top -H``, ``ps -L``, profilers and the serving benchmark's CPU
report tell the server's threads apart (Python before 3.14 leaves every thread named after the
interpreter)."""

from __future__ import annotations

import ctypes
import functools
import sys
import threading

PR_SET_NAME = 15  # prctl(2)


@functools.cache
def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread ``name`` (default: its :mod:`threading` name without the
    ``vlmamba-`` prefix) as its OS name: Linux keeps 15 bytes; elsewhere this does nothing."""
    prctl = _prctl()
    if prctl is not None:
        name = name or threading.current_thread().name.removeprefix("vlmamba-")
        prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
