"""What kind of filesystem holds a path, and the watch mode that implies (shared by the scanner,
the process set-up and ``doctor``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["filesystem_type", "is_network_fs", "watch_mode"]

# Filesystems where inotify does not report changes made by other machines (inotify(7)).
_NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "davfs", "sshfs", "virtiofs", "vboxsf", "vmhgfs", "prl_fs", "ocfs2", "gfs2", "orangefs",
})


def filesystem_type(path: Path) -> str:
    """The filesystem type holding ``path``, from /proc/self/mountinfo (longest mount-point prefix)."""
    target = str(path.resolve())
    best, best_len = "unknown", -1
    try:
        lines = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return best
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > best_len:
            best, best_len = right.split()[0], len(mount)
    return best


def is_network_fs(fstype: str) -> bool:
    # FUSE filesystems (sshfs, rclone, s3fs, ...) are treated as remote: inotify sees only local writes.
    return fstype in _NETWORK_FS or fstype.startswith("fuse.") or fstype == "fuse"


def watch_mode(configured: str, fstype: str) -> str:
    """The mode a configuration implies on a filesystem: 'inotify' or 'poll'."""
    if configured == "auto":
        return "poll" if is_network_fs(fstype) else "inotify"
    return configured
