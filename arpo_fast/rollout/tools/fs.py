"""Removing a tree that hostile code built: iteratively, through directory descriptors, never
following a symbolic link.

``shutil.rmtree`` recurses once per level (a 1,500-level tree raises ``RecursionError``) and works
with whole paths, which fail past ``PATH_MAX``. Here one directory descriptor is open at a time and
the way back up is ``..`` checked against the device and inode seen on the way down, so depth costs
neither stack nor descriptors.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger("arpo_fast.rollout.tools.python")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> bool:
    """Delete ``path`` and everything below it; a link is removed, never followed. Never raises:
    returns False (and logs) when something could not be removed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return False
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return True
        parent = os.open(os.path.dirname(os.path.abspath(path)) or "/", _DIR_FLAGS & ~os.O_NOFOLLOW)
        try:
            name = os.path.basename(os.path.abspath(path))
            _empty(parent, name)
            os.rmdir(name, dir_fd=parent)
        finally:
            os.close(parent)
        return True
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
        return False


def _open_dir(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except PermissionError:  # a folder the code made unreadable (as its owner may)
        os.chmod(name, 0o700, dir_fd=parent_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)


def _scan(fd: int) -> list[str]:
    """Unlink every non-directory in ``fd``; return the names of its sub-directories."""
    subdirs = []
    with os.scandir(fd) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(entry.name)
            continue
        try:
            os.unlink(entry.name, dir_fd=fd)
        except FileNotFoundError:
            pass
        except PermissionError:  # a folder without write permission for its owner
            os.chmod(fd, 0o700)
            os.unlink(entry.name, dir_fd=fd)
    return subdirs


def _empty(parent_fd: int, name: str) -> None:
    """Empty the directory ``name`` (in ``parent_fd``) without recursion."""
    fd = _open_dir(parent_fd, name)
    # one frame per level: its pending sub-directories, (device, inode), and its name in its parent
    stack = [(_scan(fd), _ident(fd), name)]
    try:
        while True:
            pending, _, _ = stack[-1]
            if pending:
                child = pending.pop()
                try:
                    child_fd = _open_dir(fd, child)
                except FileNotFoundError:
                    continue
                os.close(fd)
                fd = child_fd
                stack.append((_scan(fd), _ident(fd), child))
                continue
            _, _, done = stack.pop()
            if not stack:
                return
            up = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = up
            if _ident(fd) != stack[-1][1]:
                raise OSError(f"{name}: a folder was moved while it was being removed")
            os.rmdir(done, dir_fd=fd)
    finally:
        os.close(fd)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
