package runners

import (
	"errors"
	"testing"
)

func TestParseOS(t *testing.T) {
	tests := []struct {
		name, id, kernel string
		want             OS
		wantErr          bool
	}{
		{name: "debian", id: "debian", kernel: "Linux", want: Linux},
		{name: "ubuntu without kernel", id: "ubuntu", want: Linux},
		{name: "fedora", id: "fedora", kernel: "Linux", want: Linux},
		{name: "rhel", id: "rhel", want: Linux},
		{name: "alpine", id: "alpine", want: Linux},
		{name: "arch", id: "arch", want: Linux},
		{name: "opensuse-leap", id: "opensuse-leap", want: Linux},
		{name: "opensuse-tumbleweed", id: "opensuse-tumbleweed", kernel: "Linux", want: Linux},
		{name: "unknown id on Linux kernel", id: "stretchy-tiny", kernel: "Linux", want: Linux},
		{name: "unknown id without kernel", id: "stretchy-tiny", wantErr: true},
		{name: "unknown id on unknown kernel", id: "stretchy-tiny", kernel: "Plan9", wantErr: true},
		{name: "freebsd", id: "freebsd", kernel: "FreeBSD", want: FreeBSD},
		{name: "freebsd kernel only", kernel: "FreeBSD", want: FreeBSD},
		{name: "darwin", id: "darwin", want: Darwin},
		{name: "macos", id: "macos", want: Darwin},
		{name: "macOS mixed case", id: "macOS", want: Darwin},
		{name: "darwin kernel only", kernel: "Darwin", want: Darwin},
		{name: "mswindows", id: "mswindows", want: Windows},
		{name: "mswindows with kernel", id: "mswindows", kernel: "Windows NT", want: Windows},
		{name: "id and kernel disagree", id: "freebsd", kernel: "Linux", wantErr: true},
		{name: "linux id on windows kernel", id: "debian", kernel: "Windows NT", wantErr: true},
		{name: "openbsd is not freebsd", id: "openbsd", kernel: "OpenBSD", wantErr: true},
		{name: "nothing", wantErr: true},
		{name: "spaces and case", id: " Debian ", kernel: " LINUX ", want: Linux},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseOS(tt.id, tt.kernel)
			if tt.wantErr {
				if !errors.Is(err, ErrUnknownOS) {
					t.Fatalf("ParseOS(%q, %q) = %q, %v; want ErrUnknownOS", tt.id, tt.kernel, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseOS(%q, %q) = %q, %v; want %q", tt.id, tt.kernel, got, err, tt.want)
			}
		})
	}
}
