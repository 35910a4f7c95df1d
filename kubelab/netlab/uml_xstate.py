"""An LD_PRELOAD shim that lets Debian's UML 6.1 kernel run on hosts with a large XSAVE area.

Why: UML runs its guest processes as ptraced host processes and saves their
FPU state with ``ptrace(PTRACE_GETREGSET/PTRACE_SETREGSET, NT_X86_XSTATE)``
into a buffer whose size was fixed when the kernel was built (2,696 bytes in
bookworm's ``user-mode-linux`` 6.1: legacy area + header + AVX + AVX-512 +
PKRU).  The host kernel only accepts a SETREGSET of its *whole* user XSAVE
size (``xstateregs_set`` in arch/x86/kernel/fpu/regset.c returns EFAULT
otherwise), and AMX's tile state makes that 11,008+ bytes on Sapphire Rapids.
UML 6.1 then panics at the first ``init`` ("ptrace set fp regs failed,
errno = 14").  Later UML kernels size the buffer at run time (upstream
"um: Fix FP register size for XSAVE").

What the shim does, and only for ``NT_X86_XSTATE`` requests: GETREGSET goes
through a bounce buffer of the host's size and copies UML's share back;
SETREGSET pads UML's buffer with zeros up to the host's size (learnt once
from a GETREGSET with a large buffer, which the kernel clamps to exactly that
size).  Every byte UML keeps (all the AVX-512 registers) round-trips
unchanged; the bytes past it are AMX tile state, which guest processes cannot
use (it needs ``arch_prctl(ARCH_REQ_XCOMP_PERM)``), and zeros are its init
state.  Where UML's buffer already matches the host, SETREGSET passes
through untouched.

Tried first and rejected: a seccomp filter that fails UML's start-up
GETREGSET probe so it falls back to PTRACE_GETFPREGS (512 bytes) -- init then
runs, but a UML page fault then resets every register past the 512-byte
FXSAVE area, so guest programs crash in glibc's AVX/EVEX string functions.
Telling glibc and OpenSSL not to use AVX (``GLIBC_TUNABLES``,
``OPENSSL_ia32cap``) made python3 and ``ls`` run again (used here for an
hour on 2026-12-02), but any guest code with its own AVX paths stays exposed
and guests lose their vector string functions; the shim keeps the whole
AVX-512 state and needs neither.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/uio.h>

#define BOUNCE 65536 /* larger than any XSAVE area x86 defines today */

typedef long (*ptrace_fn)(enum __ptrace_request, ...);
static __thread unsigned char bounce[BOUNCE] __attribute__((aligned(64)));

long ptrace(enum __ptrace_request req, ...)
{
    va_list ap;
    va_start(ap, req);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    static ptrace_fn real;
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if ((req != PTRACE_GETREGSET && req != PTRACE_SETREGSET) || (long)addr != NT_X86_XSTATE || !data)
        return real(req, pid, addr, data);

    struct iovec *iov = data, b = {bounce, BOUNCE};
    if (req == PTRACE_GETREGSET) {
        long r = real(req, pid, addr, &b);
        if (r < 0)
            return r;
        size_t n = b.iov_len < iov->iov_len ? b.iov_len : iov->iov_len;
        memcpy(iov->iov_base, bounce, n);
        iov->iov_len = n;
        return r;
    }
    static size_t full; /* the host's whole user XSAVE size; the same for every task */
    if (!full) {
        struct iovec probe = {bounce, BOUNCE};
        long r = real(PTRACE_GETREGSET, pid, addr, &probe);
        if (r < 0)
            return r;
        full = probe.iov_len;
    }
    if (iov->iov_len >= full)
        return real(req, pid, addr, data);
    memcpy(bounce, iov->iov_base, iov->iov_len);
    memset(bounce + iov->iov_len, 0, full - iov->iov_len);
    b.iov_len = full;
    return real(req, pid, addr, &b);
}
"""


class ShimError(RuntimeError):
    """The shim could not be built (no C compiler, or it failed)."""


def shim_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build the shim once (cached by source hash) and return the path of the shared object.

    :param cache_dir: where to keep it (default ``$XDG_CACHE_HOME/kubelab`` or
        ``~/.cache/kubelab``).
    """
    base = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubelab"
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    target = base / f"uml-xstate-{digest}.so"
    if target.exists():
        return target
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise ShimError("no C compiler to build the UML XSAVE shim: apt-get install gcc")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        src = Path(tmp) / "uml_xstate.c"
        src.write_text(SHIM_SOURCE)
        out = Path(tmp) / target.name
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ShimError(f"building the UML XSAVE shim failed ({cc}):\n{r.stderr.strip()}")
        os.replace(out, target)  # atomic: concurrent builders never see half a file
    return target
