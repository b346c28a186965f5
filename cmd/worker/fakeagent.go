//go:build !soak

package main

import (
	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/internal/lifecycle"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// fakeGuestAgent is nil in every build but the soak's (fakeagent_soak.go):
// a worker on a host always talks to the real guest agent.
func fakeGuestAgent(*libvirt.Libvirt, qga.Caller) (lifecycle.Agent, error) { return nil, nil }
