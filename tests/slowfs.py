#!/usr/bin/python3
"""A slow disk outside baton-blk: a FUSE file system with one file, disk.img, whose every read
and write waits DELAY_MS before it goes to BACKING (a regular file). Requests run concurrently
(one FUSE thread each), so N requests in flight take one delay, not N. Mounted with direct_io
(no page cache: every guest request reaches the delay) and allow_other (baton-blk drops to
another uid). Runs in the foreground until unmounted (fusermount -u MOUNTPOINT) or killed.

    /usr/bin/python3 tests/slowfs.py BACKING MOUNTPOINT DELAY_MS

Debian's python3-fusepy (scripts/setup.sh installs it).
"""

import errno
import os
import stat
import sys
import time

import fusepy


class SlowDisk(fusepy.Operations):
    def __init__(self, backing, delay):
        self.fd = os.open(backing, os.O_RDWR)
        self.delay = delay

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/disk.img":
            size = os.fstat(self.fd).st_size
            return {"st_mode": stat.S_IFREG | 0o666, "st_nlink": 1, "st_size": size}
        raise fusepy.FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "disk.img"]

    def open(self, path, flags):
        if path != "/disk.img":
            raise fusepy.FuseOSError(errno.ENOENT)
        return 0

    def read(self, path, size, offset, fh):
        time.sleep(self.delay)
        return os.pread(self.fd, size, offset)

    def write(self, path, data, offset, fh):
        time.sleep(self.delay)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        raise fusepy.FuseOSError(errno.EPERM)

    def fsync(self, path, datasync, fh):
        time.sleep(self.delay)
        os.fdatasync(self.fd)
        return 0

    def flush(self, path, fh):
        return 0


def main():
    backing, mountpoint, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    fusepy.FUSE(
        SlowDisk(backing, delay_ms / 1000.0),
        mountpoint,
        foreground=True,
        nothreads=False,
        allow_other=True,
        direct_io=True,
    )


if __name__ == "__main__":
    main()
