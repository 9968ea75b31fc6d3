"""The interpreter a run uses: which directories it needs, and a copy others can read.

A run never has the trainer's privileges, so the interpreter must be usable by another uid. A
sandbox with its own mount namespace binds the interpreter's directories under fresh 0755 parents;
without one (the ``uid`` mode), every directory above the interpreter must be searchable by others.
A pyenv or conda under ``/root`` (mode 0700) is not, so :func:`readable_copy` copies the standard
library and the binary once into a root-owned cache that others can read, leaving the user's files as
they are. A virtualenv's ``site-packages`` is linked to where it is when others can read it there,
and copied otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from functools import lru_cache

log = logging.getLogger("arpo_fast.rollout.tools.python")

_COPY_FORMAT = 2  # bump when the layout of the copy changes
_INFO = (
    "import json, sys, sysconfig; print(json.dumps({'prefix': sys.prefix, 'base_prefix': "
    "sys.base_prefix, 'executable': sys.executable, 'version': '%d.%d' % sys.version_info[:2], "
    "'path': sys.path, 'libdir': sysconfig.get_config_var('LIBDIR') or '', "
    "'ldlibrary': sysconfig.get_config_var('LDLIBRARY') or ''}))"
)


@lru_cache(maxsize=8)
def info(python: str) -> dict:
    """The interpreter's prefixes, version, ``sys.path`` and shared library (run once, cached)."""
    out = subprocess.run(
        [python, "-I", "-c", _INFO], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return json.loads(out)


_COMPILE = (
    "import marshal, sys; "
    "sys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.read(), 'launcher.py', 'exec')))"
)


@lru_cache(maxsize=8)
def compiled(python: str, source: str) -> bytes:
    """``source`` compiled by ``python`` and marshalled (the format is the interpreter's own)."""
    return subprocess.run(
        [python, "-I", "-S", "-c", _COMPILE],
        input=source.encode(),
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout


def roots(python: str) -> tuple[str, ...]:
    """Directories the interpreter needs: its prefix, a virtualenv's prefix, its binary's."""
    i = info(python)
    found = {os.path.realpath(i["prefix"]), os.path.realpath(i["base_prefix"])}
    found.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    found.add(os.path.dirname(os.path.abspath(python)))
    # a venv's bin/python is a symlink; its own directory must exist inside too
    found.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    found = {r for r in found if r not in ("/", "/usr") and not r.startswith("/usr/")}
    # a root inside another root is already visible through the outer bind
    return tuple(sorted(r for r in found if not any(r.startswith(o + "/") for o in found)))


def reachable_by_others(path: str) -> bool:
    """Whether a uid with no special rights can reach ``path`` (every folder above it searchable)
    and read it."""
    real = os.path.realpath(path)
    parts = real.split("/")
    try:
        for i in range(2, len(parts)):
            if not os.stat("/".join(parts[:i])).st_mode & stat.S_IXOTH:
                return False
        return bool(os.stat(real).st_mode & stat.S_IROTH)
    except OSError:
        return False


def readable_copy(python: str) -> str:
    """``python`` if others can run it, else the path of a copy they can (made once per machine and
    interpreter, in a root-owned cache). Raises OSError when the copy cannot be made."""
    i = info(python)
    needed = [p for p in i["path"] if os.path.isdir(p)] + [os.path.realpath(i["executable"])]
    if all(reachable_by_others(p) for p in needed):
        return python
    stamp = os.stat(os.path.realpath(i["executable"])).st_mtime_ns
    key = hashlib.sha256(json.dumps([_COPY_FORMAT, i, stamp]).encode()).hexdigest()[:16]
    cache = _cache_dir()
    dest = os.path.join(cache, f"python-{key}")
    exe = os.path.join(dest, "venv" if _is_venv(i) else "base", "bin", f"python{i['version']}")
    if _trusted(dest):
        return exe
    log.info("python tool: copying the interpreter to %s so that the run's uid can read it", dest)
    tmp = tempfile.mkdtemp(prefix=".python-", dir=cache)
    try:
        _build(i, tmp, dest)
        _open_up(tmp)
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _trusted(dest):  # another process may have made it first
            raise
    return exe


def _is_venv(i: dict) -> bool:
    return os.path.realpath(i["prefix"]) != os.path.realpath(i["base_prefix"])


def _cache_dir() -> str:
    """A root-owned folder others can search; /var/cache when it exists (nobody else can plant a
    folder there), else the system's temporary directory."""
    for parent in ("/var/cache", tempfile.gettempdir()):
        path = os.path.join(parent, "arpo_fast")
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError:
            continue
        if _trusted(path):
            return path
    raise OSError(
        "no root-owned cache folder for the interpreter copy (tried /var/cache/arpo_fast "
        f"and {tempfile.gettempdir()}/arpo_fast)"
    )


def _trusted(path: str) -> bool:
    """A real folder owned by root that no one else may write."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022


def _build(i: dict, dest: str, final: str) -> None:
    """Make the copy in ``dest``; it will be renamed to ``final`` (the path pyvenv.cfg names)."""
    version, base = i["version"], os.path.realpath(i["base_prefix"])
    os.makedirs(os.path.join(dest, "base", "bin"))
    exe = os.path.join(dest, "base", "bin", f"python{version}")
    shutil.copy2(os.path.realpath(i["executable"]), exe)
    _relative_runpath(exe, i["libdir"])
    lib = os.path.join(dest, "base", "lib")
    os.makedirs(lib)
    if i["ldlibrary"].endswith(".so") or ".so." in i["ldlibrary"]:
        for name in os.listdir(i["libdir"]):
            if name.startswith(f"libpython{version}") and ".so" in name:
                shutil.copy2(os.path.join(i["libdir"], name), os.path.join(lib, name), follow_symlinks=False)
    stdlib = os.path.join(base, "lib", f"python{version}")
    skip = shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter", "turtledemo")
    shutil.copytree(stdlib, os.path.join(lib, f"python{version}"), symlinks=True, ignore=skip)
    site = os.path.join(lib, f"python{version}", "site-packages")
    if not _is_venv(i):
        _link_or_copy(os.path.join(stdlib, "site-packages"), site)
        return
    os.makedirs(site)
    venv = os.path.join(dest, "venv")
    os.makedirs(os.path.join(venv, "bin"))
    os.symlink(f"../../base/bin/python{version}", os.path.join(venv, "bin", f"python{version}"))
    with open(os.path.join(i["prefix"], "pyvenv.cfg")) as f:
        system_site = "include-system-site-packages = true" in f.read().replace("True", "true")
    with open(os.path.join(venv, "pyvenv.cfg"), "w") as f:
        f.write(
            f"home = {os.path.join(final, 'base', 'bin')}\n"
            f"include-system-site-packages = {'true' if system_site else 'false'}\n"
            f"version = {version}\n"
        )
    if system_site:
        os.rmdir(site)
        _link_or_copy(os.path.join(stdlib, "site-packages"), site)
    venv_lib = os.path.join(venv, "lib", f"python{version}")
    os.makedirs(venv_lib)
    _link_or_copy(
        os.path.join(i["prefix"], "lib", f"python{version}", "site-packages"),
        os.path.join(venv_lib, "site-packages"),
    )


def _relative_runpath(exe: str, libdir: str) -> None:
    """Point the copied binary's library search path (RUNPATH, as pyenv builds it: the absolute
    ``libdir``) at the copied ``../lib``, so that it loads the copied libpython and not whatever
    the system has. The string is rewritten in place, padded with NULs; a binary where it is not
    found exactly once is left as it is (it then works when started as root)."""
    with open(exe, "rb") as f:
        data = f.read()
    needle = b"\0" + os.fsencode(libdir) + b"\0"
    if not libdir or data.count(needle) != 1:
        return
    new = b"$ORIGIN/../lib".ljust(len(needle) - 2, b"\0")
    at = data.index(needle) + 1
    with open(exe, "r+b") as f:
        f.seek(at)
        f.write(new)


def _link_or_copy(src: str, dest: str) -> None:
    if not os.path.isdir(src):
        os.makedirs(dest, exist_ok=True)
    elif reachable_by_others(src):
        os.symlink(os.path.realpath(src), dest)
    else:
        shutil.copytree(src, dest, symlinks=True)


def _open_up(top: str) -> None:
    """Folders 0755, files readable by all (executables stay executable)."""
    os.chmod(top, 0o755)
    for folder, dirs, files in os.walk(top):
        for d in dirs:
            if not os.path.islink(os.path.join(folder, d)):
                os.chmod(os.path.join(folder, d), 0o755)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                mode = os.stat(path).st_mode
                os.chmod(path, 0o755 if mode & 0o100 else 0o644)
