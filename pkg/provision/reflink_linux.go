package provision

import (
	"errors"
	"fmt"
	"os"
	"syscall"
)

// ficlone is FICLONE from <linux/fs.h>: _IOW(0x94, 9, int).
const ficlone = 0x40049409

// reflink makes the existing file dst a copy of src that shares src's
// extents, through the FICLONE ioctl: constant time on file systems with
// reflinks (btrfs, XFS with reflink=1, bcachefs, OCFS2).
func reflink(dst, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	// FICLONE needs no data in dst; libvirt's header (or sparse file) goes.
	_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, out.Fd(), ficlone, in.Fd())
	if errno != 0 {
		_ = out.Close()
		return &os.PathError{Op: "FICLONE", Path: dst, Err: errno}
	}
	return out.Close()
}

// reflinkUnsupported reports whether err is the file system declining to
// share extents, rather than an I/O failure.
func reflinkUnsupported(err error) bool {
	return errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOTTY) ||
		errors.Is(err, syscall.EXDEV) || errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.ENOSYS)
}

// fsMagic names file systems by their statfs magic number.
var fsMagic = map[int64]string{
	0xEF53:     "ext2/3/4",
	0x58465342: "xfs",
	0x9123683E: "btrfs",
	0xCA451A4E: "bcachefs",
	0x7461636F: "ocfs2",
	0x2FC12FC1: "zfs",
	0x01021994: "tmpfs",
	0x794C7630: "overlayfs",
	0x6969:     "nfs",
	0xFF534D42: "cifs",
	0xFE534D42: "smb2",
	0x65735546: "fuse",
	0x858458F6: "ramfs",
	0xF2F52010: "f2fs",
}

// fsName names the file system holding path, for messages.
func fsName(path string) string {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return "an unknown file system"
	}
	if name, ok := fsMagic[int64(st.Type)]; ok {
		return name
	}
	return fmt.Sprintf("file system type %#x", st.Type)
}
