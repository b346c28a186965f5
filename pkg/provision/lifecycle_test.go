package provision

import (
	"testing"

	"libvirt.org/go/libvirtxml"
)

func TestOwnedVolumePath(t *testing.T) {
	tests := []struct {
		job, path string
		want      bool
	}{
		{"a", "/pool/stretchy-a-vda.qcow2", true},
		{"a", "/pool/stretchy-a-nvram.fd", true},
		{"a", "stretchy-a-vdb.img", true},
		{"a-b", "/pool/stretchy-a-b-vda.qcow2", true},
		{"a", "/pool/stretchy-a-b-vda.qcow2", false}, // job a-b's volume
		{"a", "/pool/tiny-linux.qcow2", false},
		{"a", "/pool/stretchy-a-", false},
		{"a", "/stretchy-a-dir/tiny.qcow2", false},
		{"a", "/pool/xstretchy-a-vda.qcow2", false},
	}
	for _, tt := range tests {
		t.Run(tt.job+" "+tt.path, func(t *testing.T) {
			if got := ownedVolumePath(tt.job, tt.path); got != tt.want {
				t.Errorf("ownedVolumePath(%q, %q) = %v, want %v", tt.job, tt.path, got, tt.want)
			}
		})
	}
}

func TestVolumeKey(t *testing.T) {
	tests := []struct {
		path, job string
		ok        bool
	}{
		{"/pool/stretchy-a-vda.qcow2", "a", true},
		{"/pool/stretchy-a-b-nvram.fd", "a-b", true},
		{"stretchy-job_1-vdb.img", "job_1", true},
		{"/pool/tiny-linux.qcow2", "", false},
		{"/pool/stretchy-vda.qcow2", "", false},
		{"/pool/stretchy-a-", "", false},
		{"/pool/stretchy--vda", "", false},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			job, ok := VolumeKey(tt.path)
			if ok != tt.ok || (ok && job != tt.job) {
				t.Errorf("VolumeKey(%q) = %q, %v; want %q, %v", tt.path, job, ok, tt.job, tt.ok)
			}
			if ok && !ownedVolumePath(job, tt.path) {
				t.Errorf("ownedVolumePath(%q, %q) = false for the job VolumeKey found", job, tt.path)
			}
		})
	}
}

func TestVolumeBytes(t *testing.T) {
	tests := []struct {
		size    libvirtxml.StorageVolumeSize
		want    uint64
		wantErr bool
	}{
		{libvirtxml.StorageVolumeSize{Unit: "bytes", Value: 67108864}, 67108864, false},
		{libvirtxml.StorageVolumeSize{Value: 5}, 5, false},
		{libvirtxml.StorageVolumeSize{Unit: "GiB", Value: 2}, 2 << 30, false},
		{libvirtxml.StorageVolumeSize{Unit: "G", Value: 2}, 2 << 30, false},
		{libvirtxml.StorageVolumeSize{Unit: "GB", Value: 2}, 2e9, false},
		{libvirtxml.StorageVolumeSize{Unit: "parsecs", Value: 2}, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.size.Unit, func(t *testing.T) {
			got, err := volumeBytes(&tt.size)
			if got != tt.want || (err != nil) != tt.wantErr {
				t.Errorf("volumeBytes(%+v) = %d, %v; want %d, error %v", tt.size, got, err, tt.want, tt.wantErr)
			}
		})
	}
}
