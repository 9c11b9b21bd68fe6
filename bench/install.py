"""Find or install the peer servers (Debian's ``redis-server`` and ``nats-server``).

``ensure(binary)`` returns the absolute path of the binary, installing its
Debian package with apt-get if it is missing (``apt-get update`` is run once
per process first).  Any failure raises :class:`InstallError` with a readable
reason; the harness turns that into ``{"status": "skipped", "reason": ...}``
for the peer instead of crashing. With ``STREAMD_BENCH_NO_INSTALL=1`` in the
environment nothing is installed: a missing binary is reported at once (smoke tests
use it to stay fast on a machine without the peers).
"""

from __future__ import annotations

import os
import shutil
import subprocess

# binary name -> Debian package that ships it
PACKAGES = {
    "redis-server": "redis-server",
    "nats-server": "nats-server",
}

NO_INSTALL_ENV = "STREAMD_BENCH_NO_INSTALL"
_SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin", "/bin", "/sbin")
_apt_updated = False


class InstallError(RuntimeError):
    """The binary is missing and could not be installed."""


def which(binary: str) -> str | None:
    path = shutil.which(binary)
    if path:
        return path
    for d in _SEARCH_DIRS:
        cand = os.path.join(d, binary)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def _run(argv: list[str], timeout: float) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        proc = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=timeout, text=True,
        )
    except FileNotFoundError as e:
        raise InstallError(f"{argv[0]} not available: {e}") from e
    except subprocess.TimeoutExpired as e:
        raise InstallError(f"{' '.join(argv)} timed out after {timeout:.0f}s") from e
    if proc.returncode != 0:
        tail = " | ".join(proc.stdout.strip().splitlines()[-3:])
        raise InstallError(f"{' '.join(argv)} exited {proc.returncode}: {tail}")


def _apt_install(package: str) -> None:
    global _apt_updated
    if shutil.which("apt-get") is None:
        raise InstallError("apt-get not found (not a Debian-like system)")
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        raise InstallError("apt-get install needs root")
    if not _apt_updated:
        _run(["apt-get", "update", "-q"], timeout=300)
        _apt_updated = True
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", package], timeout=600)


def ensure(binary: str) -> str:
    """Return the path of ``binary``, apt-installing its package if needed."""
    path = which(binary)
    if path:
        return path
    if os.environ.get(NO_INSTALL_ENV):
        raise InstallError(f"{binary} not installed and {NO_INSTALL_ENV} is set")
    package = PACKAGES.get(binary, binary)
    _apt_install(package)
    path = which(binary)
    if not path:
        raise InstallError(f"installed package {package} but {binary} is still not on PATH")
    return path


def version(path: str, flag: str = "--version") -> str:
    """First line of ``path --version``, or '' if that fails."""
    try:
        out = subprocess.run([path, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=10, text=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip().splitlines()[0] if out.strip() else ""


if __name__ == "__main__":  # python -m bench.install
    for b in PACKAGES:
        try:
            print(b, ensure(b), version(ensure(b)))
        except InstallError as e:
            print(b, "FAILED:", e)
