package runners

import (
	"errors"
	"fmt"
	"strings"
)

// OS is an operating system family. Families differ in paths, in how root
// starts a program as another user, and in the shell that runs scripts.
type OS string

// The OS families a plan can be made for.
const (
	Linux   OS = "linux"
	FreeBSD OS = "freebsd"
	Darwin  OS = "darwin"
	Windows OS = "windows"
)

// ErrUnknownOS means ParseOS cannot tell the OS family from what the guest
// agent reported.
var ErrUnknownOS = errors.New("unknown guest OS")

// linuxIDs are os-release ids of Linux distributions. They let ParseOS
// recognise Linux when the kernel name is missing; with a kernel name of
// "Linux", any id is accepted.
var linuxIDs = map[string]bool{
	"almalinux": true, "alpine": true, "amzn": true, "arch": true,
	"archlinux": true, "azurelinux": true, "centos": true, "debian": true,
	"fedora": true, "flatcar": true, "gentoo": true, "kali": true,
	"linuxmint": true, "manjaro": true, "mariner": true, "nixos": true,
	"ol": true, "pop": true, "raspbian": true, "rhel": true, "rocky": true,
	"sled": true, "sles": true, "ubuntu": true, "void": true,
}

// ParseOS maps the "id" and "kernel-name" fields of the guest agent's
// guest-get-osinfo reply to an OS family. Either may be empty. Known ids are
// "mswindows", "freebsd", "darwin" or "macos" (any case), and the os-release
// ids of common Linux distributions, "opensuse*" included. An id that is none
// of these, such as "stretchy-tiny", counts as Linux only when the kernel
// name is "Linux", because os-release ids are open-ended. When id and kernel
// name both name a family and disagree, ParseOS returns ErrUnknownOS rather
// than guess.
func ParseOS(id, kernelName string) (OS, error) {
	byID := osFromID(strings.ToLower(strings.TrimSpace(id)))
	byKernel := osFromKernel(strings.ToLower(strings.TrimSpace(kernelName)))
	switch {
	case byID != "" && byKernel != "" && byID != byKernel:
		return "", fmt.Errorf("id %q is %s but kernel %q is %s: %w", id, byID, kernelName, byKernel, ErrUnknownOS)
	case byKernel != "":
		return byKernel, nil
	case byID != "":
		return byID, nil
	}
	return "", fmt.Errorf("id %q, kernel %q: %w", id, kernelName, ErrUnknownOS)
}

func osFromID(id string) OS {
	switch {
	case id == "mswindows" || id == "windows":
		return Windows
	case id == "freebsd":
		return FreeBSD
	case id == "darwin" || id == "macos":
		return Darwin
	case id == "linux" || linuxIDs[id] || strings.HasPrefix(id, "opensuse"):
		return Linux
	}
	return ""
}

func osFromKernel(k string) OS {
	switch {
	case k == "linux":
		return Linux
	case k == "freebsd":
		return FreeBSD
	case k == "darwin":
		return Darwin
	case strings.HasPrefix(k, "windows"):
		return Windows
	}
	return ""
}

// valid reports whether os is one of the families above.
func (os OS) valid() bool {
	switch os {
	case Linux, FreeBSD, Darwin, Windows:
		return true
	}
	return false
}
