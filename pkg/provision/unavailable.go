package provision

import (
	"errors"
	"io"
	"net"
	"syscall"

	"github.com/digitalocean/go-libvirt"
)

// IsUnavailable reports whether err means libvirtd could not be reached or
// the connection broke, rather than libvirt refusing the request. Callers
// retry such errors later instead of failing the job.
func IsUnavailable(err error) bool {
	var opErr *net.OpError
	switch {
	case err == nil:
		return false
	case errors.Is(err, ErrTimeout), errors.Is(err, ErrDisconnected),
		errors.Is(err, libvirt.ErrInterrupted),
		errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, net.ErrClosed), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE),
		errors.Is(err, syscall.ENOENT) && errors.As(err, &opErr),
		errors.As(err, &opErr):
		return true
	}
	return hasCode(err, libvirt.ErrNoConnect, libvirt.ErrRPC)
}
