package provision

import (
	"errors"
	"strings"

	"github.com/digitalocean/go-libvirt"
)

// Sentinel errors for the branches callers take. They are always wrapped
// with the image or job they concern and the reason.
var (
	// ErrImageNotFound means no domain with the image's name exists.
	ErrImageNotFound = errors.New("no such image")
	// ErrImageInvalid means the image exists but cannot be cloned as it is,
	// for example because it is running or a writable disk is not a
	// storage volume.
	ErrImageInvalid = errors.New("invalid image")
	// ErrExists means the machine for the job is already defined. Callers
	// that retry a provision request treat it as success.
	ErrExists = errors.New("machine already exists")
	// ErrNotFound means no machine exists for the job.
	ErrNotFound = errors.New("no such machine")
	// ErrInvalidJobID means the job id cannot name a domain and its volumes.
	ErrInvalidJobID = errors.New("invalid job id")
	// ErrInvalidCloneMode means a Spec or an image's metadata names a clone
	// mode that does not exist. From the image's metadata it comes with
	// ErrImageInvalid.
	ErrInvalidCloneMode = errors.New("invalid clone mode")
	// ErrInvalidSpec means a Spec's size or console directory is not
	// usable: a negative size, or a directory that is not absolute.
	ErrInvalidSpec = errors.New("invalid machine spec")
	// ErrReflinkUnsupported means reflink mode was asked for but a pool's
	// file system cannot share extents (or the pool is not a local
	// directory). It always comes with ErrImageInvalid: retrying cannot
	// help, another mode can.
	ErrReflinkUnsupported = errors.New("reflink copies not supported")
	// ErrTimeout means libvirtd did not answer a call in time; the
	// connection is then presumed hung. IsUnavailable reports it.
	ErrTimeout = errors.New("libvirt call timed out")
	// ErrDisconnected means the call was made while the connection to
	// libvirtd was down. IsUnavailable reports it.
	ErrDisconnected = errors.New("not connected to libvirt")
)

// libvirtCode reports the libvirt error number carried by err, if any.
// It is the one place that looks inside libvirt errors; the predicates below
// name the cases this package branches on.
func libvirtCode(err error) (libvirt.ErrorNumber, string, bool) {
	var e libvirt.Error
	if !errors.As(err, &e) {
		return 0, "", false
	}
	return libvirt.ErrorNumber(e.Code), e.Message, true
}

func hasCode(err error, codes ...libvirt.ErrorNumber) bool {
	code, _, ok := libvirtCode(err)
	if !ok {
		return false
	}
	for _, c := range codes {
		if code == c {
			return true
		}
	}
	return false
}

// isNoDomain reports whether err says the domain does not exist.
func isNoDomain(err error) bool { return hasCode(err, libvirt.ErrNoDomain) }

// isNoStorageVol reports whether err says the storage volume does not exist.
func isNoStorageVol(err error) bool { return hasCode(err, libvirt.ErrNoStorageVol) }

// isNoStoragePool reports whether err says the storage pool does not exist.
func isNoStoragePool(err error) bool { return hasCode(err, libvirt.ErrNoStoragePool) }

// isNoMetadata reports whether err says the domain has no metadata in the
// requested namespace.
func isNoMetadata(err error) bool { return hasCode(err, libvirt.ErrNoDomainMetadata) }

// isNotRunning reports whether err is libvirt refusing to stop a domain that
// is already shut off ("domain is not running").
func isNotRunning(err error) bool { return hasCode(err, libvirt.ErrOperationInvalid) }

// isUnsupportedFlags reports whether err is libvirt rejecting flags that the
// driver or daemon version does not know, so the call may be retried with
// fewer flags.
func isUnsupportedFlags(err error) bool {
	code, msg, ok := libvirtCode(err)
	if !ok {
		return false
	}
	switch code {
	case libvirt.ErrNoSupport, libvirt.ErrArgumentUnsupported, libvirt.ErrOperationUnsupported:
		return true
	case libvirt.ErrInvalidArg:
		// virCheckFlags reports unknown flags as VIR_ERR_INVALID_ARG
		// "unsupported flags (0x..) in function ...".
		return strings.Contains(msg, "unsupported flags")
	}
	return false
}
