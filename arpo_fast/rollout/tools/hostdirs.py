"""The host's world-writable folders, and what a run's uid leaves in them.

In the ``uid`` mode a run shares the host's file system: it may write wherever every user may
(``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``, a ``chmod 1777`` folder anywhere), and what it
leaves there could reach a later run or another user. Those folders are found once per process by a
breadth-first walk over the folders other users can enter, and after each run everything its uid
owns in them is removed (see :func:`sweep_files`).
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from collections.abc import Container
from typing import Optional

from arpo_fast.rollout.tools.fs import remove_tree

log = logging.getLogger("arpo_fast.rollout.tools.python")

USUAL = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue")
"""Where every user may write on most systems (kept even when the walk does not reach them)."""
MAX_FOLDERS = 50_000
"""Folders listed at most by the walk (22,000 took 2.5 to 4 s on a busy 2-core machine): breadth
first, so the shallow ones, where world-writable folders live, come first; where it stops is
logged."""
_PSEUDO = frozenset(
    "proc sysfs cgroup cgroup2 devpts securityfs debugfs tracefs bpf fusectl configfs pstore "
    "binfmt_misc autofs hugetlbfs efivarfs nsfs rpc_pipefs selinuxfs".split()
)
_REMOTE = frozenset("nfs nfs4 cifs smb3 smbfs ceph glusterfs lustre gpfs beegfs 9p".split())
"""Network file systems (and FUSE ones, e.g. a bucket mounted for data) are not walked: listing
them can take hours, and datasets live there."""
_FOUND: dict[int, tuple[str, ...]] = {}


def writable_dirs() -> tuple[str, ...]:
    """The world-writable folders of this host that other users can reach (found once per
    process)."""
    if os.getpid() not in _FOUND:
        found, note = find(max_folders=MAX_FOLDERS)
        log.info("python tool: world-writable folders swept after each run: %s%s", ", ".join(found), note)
        _FOUND[os.getpid()] = found
    return _FOUND[os.getpid()]


def find(root: str = "/", max_folders: int = MAX_FOLDERS) -> tuple[tuple[str, ...], str]:
    """(world-writable folders under ``root`` that other users can reach, a note on where the walk
    stopped short or ''). Read-only, pseudo, network and FUSE file systems are skipped; so are leaf folders
    (a link count of 2 means no sub-folder), which saves most of the listing."""
    skip = _skipped_mounts()
    found = list(usual()) if root == "/" else []
    queue: deque[tuple[str, int, int]] = deque([(root, 0, 0)])
    listed = 0
    while queue:
        folder, depth, links = queue.popleft()
        if links == 2:
            continue
        if listed >= max_folders:
            return tuple(found), f" (the walk stopped after {listed} folders, {depth} levels down)"
        listed += 1
        for path, st in _sub_folders(folder):
            if path in skip:
                continue
            if st.st_mode & 0o002 and path not in found:
                found.append(path)
            # what is below a folder others may enter is theirs to reach; a sticky shared folder
            # (/tmp) holds what users put there at any time: the sweep looks one level into it
            # after each run instead
            if st.st_mode & 0o001 and not st.st_mode & 0o1002 == 0o1002:
                queue.append((path, depth + 1, st.st_nlink))
    return tuple(found), ""


def _sub_folders(folder: str) -> list[tuple[str, os.stat_result]]:
    out: list[tuple[str, os.stat_result]] = []
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return out
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                out.append((entry.path, entry.stat(follow_symlinks=False)))
        except OSError:
            continue
    return out


def _world_writable(path: str) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & 0o002)


def _skipped_mounts(mountinfo: str = "/proc/self/mountinfo") -> set[str]:
    """Mount points not walked: pseudo and read-only file systems (nobody writes there), network
    and FUSE ones."""
    skip = set()
    try:
        with open(mountinfo) as f:
            for line in f:
                fields = line.split()
                fstype = fields[fields.index("-") + 1]
                remote = fstype in _REMOTE or fstype.startswith("fuse")
                if fstype in _PSEUDO or remote or "ro" in fields[5].split(","):
                    skip.add(fields[4].replace("\\040", " "))
    except (OSError, ValueError, IndexError):
        pass
    return skip


def owned_entries(dirs: tuple[str, ...], owners: Container[int], by_group: bool = False) -> list[str]:
    """What a uid in ``owners`` (or, ``by_group``, a gid in it) owns in the folders ``dirs``:
    entries at their top level, and one level into world-writable folders there
    (``/tmp/.X11-unix`` and the like). Deeper files in folders of other users are not searched."""
    found = []
    for top in dirs:
        for entry in _entries(top):
            st = _lstat(entry)
            if st is None:
                continue
            if st.st_uid in owners or (by_group and st.st_gid in owners):
                found.append(entry.path)
            elif stat.S_ISDIR(st.st_mode) and st.st_mode & 0o002:
                for inner in _entries(entry.path):
                    inner_st = _lstat(inner)
                    if inner_st is not None and (
                        inner_st.st_uid in owners or (by_group and inner_st.st_gid in owners)
                    ):
                        found.append(inner.path)
    return found


def remove_owned(uid: int, dirs: Optional[tuple[str, ...]] = None) -> None:
    """Remove what ``uid`` owns in ``dirs`` (default: the usual world-writable folders), as
    :func:`owned_entries` finds it; links are removed, never followed."""
    for path in owned_entries(dirs if dirs is not None else usual(), range(uid, uid + 1)):
        remove_tree(path)


def usual() -> tuple[str, ...]:
    """The folders of :data:`USUAL` that exist here and are world-writable."""
    return tuple(d for d in USUAL if _world_writable(d))


def _lstat(entry: os.DirEntry) -> Optional[os.stat_result]:
    try:
        return entry.stat(follow_symlinks=False)
    except OSError:
        return None


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []
