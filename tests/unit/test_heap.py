"""The allocator tuning applies on glibc (in a child: it changes the whole process)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ctypes, ctypes.util
from replication.heap import keep_large_buffers_on_heap
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def roundtrip():
    # Freed and allocated again: from the heap it comes back at the same address; as a
    # fresh mmap it usually lands elsewhere, and pages fault in again.
    a = libc.malloc(4 << 20)
    libc.free(a)
    b = libc.malloc(4 << 20)
    libc.free(b)
    return a == b
import sys
tuned = keep_large_buffers_on_heap()
print(tuned, roundtrip())
"""


def test_big_buffers_are_reused_from_the_heap() -> None:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.split() == ["True", "True"]
