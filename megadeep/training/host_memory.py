"""How a CPU rank's glibc allocator treats freed tensors (``ResolvedRun.host_allocator``): ``lean`` keeps
the rank's memory at its partitions, ``reuse`` keeps every freed block for the next step. GPU ranks keep
glibc's defaults (their tensors live in CUDA's caching allocator). PyTorch has no caching allocator for
CPU tensors, so on CPU these two are the trade a caching allocator makes: memory held vs page faults.

lean (for a measured excess, ``python -m bench.construction``: peak RSS per rank during construction
and step 1 against its parameter + optimizer partition):

glibc's allocator keeps freed blocks of up to 32 MiB in its heaps (its mmap threshold grows with
every large free), so transient tensors (construction's random-number temporaries, DeepSpeed's
setup copies, activations, gradient buckets and flattened copies) stay resident after they are freed
and step 1's Adam moments come on top. For CPU ranks under ZeRO-3 (``ResolvedRun.host_allocator`` lean),
after the model is built, blocks of 64 KiB and up are mapped and unmapped on their own, so freeing returns them, and
the trainer trims the heap after DeepSpeed's setup and after each backward. Going back to glibc's
32 MiB after step 1 let step 2 reach 1.8x the partitions (measured). Not during construction: the
counter RNG's many large temporaries would each pay fresh page faults (2.5x the build's CPU time).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024
GLIBC_MAX_THRESHOLD = 32 * 1024 * 1024  # where glibc's own threshold ends up after large frees (64-bit)
GLIBC_MMAP_MAX = 65536  # glibc's default, which reuse_freed_memory sets to 0


@functools.lru_cache(maxsize=None)
def _glibc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; a no-op elsewhere). Needed
    besides the threshold: glibc serves large requests from free heap chunks before mapping new
    ones, so blocks freed while the threshold was high are reused and retained again."""
    if _glibc() is not None:
        _glibc().malloc_trim(0)


def tune_cpu_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Return free heap memory to the system and map blocks of ``threshold`` bytes and up separately
    from now on (glibc only), so freed tensors leave the process. Returns whether it applied. Costs
    page faults on each fresh large tensor: the step-time effect is measured in ``bench.construction``
    (steps at 64 KiB vs glibc's 32 MiB, interleaved). Maps again if a run in this process had
    :func:`reuse_freed_memory` turn mapping off (its high trim threshold does not matter here: mapped
    blocks bypass the heap, and the trainer trims it explicitly)."""
    lib = _glibc()
    if lib is None:
        return False
    lib.mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
    release_freed_memory()
    return bool(lib.mallopt(M_MMAP_THRESHOLD, threshold))


def reuse_freed_memory() -> bool:
    """Serve every request from the heap and never shrink it (glibc only), so each step's tensors
    reuse resident pages. Without it, tensors over glibc's 32 MiB ceiling (the logits, the embedding's
    and head's gradients at vocab 32000) are mapped afresh and page-faulted in every step: ~110k
    faults per step at the 60M shape of ``bench.train_throughput``, 5-7% of its step. The heap keeps
    its high-water mark (the trim threshold is glibc's largest, 2 GiB of free top). Returns whether
    it applied."""
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_MAX, 0)) and bool(lib.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
