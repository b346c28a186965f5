package main

import (
	"context"
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

func TestParseIsolateTarget(t *testing.T) {
	pfx := netip.MustParsePrefix
	tests := []struct {
		in   string
		want isolateTarget
		bad  bool
	}{
		{in: "192.0.2.7", want: isolateTarget{Prefix: pfx("192.0.2.7/32")}},
		{in: "192.0.2.7:4222", want: isolateTarget{Prefix: pfx("192.0.2.7/32"), Port: 4222}},
		{in: "[2001:db8::1]:16514", want: isolateTarget{Prefix: pfx("2001:db8::1/128"), Port: 16514}},
		{in: "2001:db8::1", want: isolateTarget{Prefix: pfx("2001:db8::1/128")}},
		{in: "198.51.100.9/24", want: isolateTarget{Prefix: pfx("198.51.100.0/24")}},
		{in: "198.51.100.0/24:22", want: isolateTarget{Prefix: pfx("198.51.100.0/24"), Port: 22}},
		{in: "nats.example.internal:4222", want: isolateTarget{Host: "nats.example.internal", Port: 4222}},
		{in: "vault.example.internal", want: isolateTarget{Host: "vault.example.internal"}},
		{in: "192.0.2.7:0", bad: true},
		{in: "192.0.2.7:70000", bad: true},
		{in: "host:port", bad: true},
		{in: ":4222", bad: true},
		{in: "a b", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseIsolateTarget(tt.in)
			if tt.bad {
				if err == nil {
					t.Fatalf("parsed as %+v, want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("= %+v, %v; want %+v", got, err, tt.want)
			}
			if again, err := parseIsolateTarget(got.String()); err != nil || again != got {
				t.Errorf("%q (String) parses as %+v, %v", got.String(), again, err)
			}
		})
	}
}

// fakeResolver answers from a table, as DNS would.
type fakeResolver map[string][]netip.Addr

func (r fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	if a, ok := r[host]; ok {
		return a, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

func TestControlPlaneDeny(t *testing.T) {
	host := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("fd00::2")}
	dns := fakeResolver{
		"nats1.example.internal": {netip.MustParseAddr("198.51.100.11")},
		"nats2.example.internal": {netip.MustParseAddr("198.51.100.12"), netip.MustParseAddr("2001:db8::12")},
	}
	// onHost is every host address with each port.
	onHost := func(ports ...uint16) []string {
		var out []string
		for _, h := range host {
			for _, p := range ports {
				out = append(out, provision.Deny{Prefix: netip.PrefixFrom(h, h.BitLen()), Port: p}.String())
			}
		}
		return out
	}
	tests := []struct {
		name string
		cp   controlPlane
		want []string
		err  string
	}{
		{"embedded NATS", controlPlane{NATSURLs: "nats://127.0.0.1:4222", LibvirtURI: "qemu:///system"},
			onHost(4222, 16509, 16514), ""},
		{"a NATS cluster by name, metrics on every address", controlPlane{
			NATSURLs: "tls://user:secret@nats1.example.internal:4222,nats://nats2.example.internal", HTTPAddr: ":9464", LibvirtURI: "qemu:///system"},
			append(onHost(4222, 9464, 16509, 16514), "198.51.100.11:4222", "198.51.100.12:4222", "[2001:db8::12]:4222"), ""},
		{"extra destinations and a remote libvirtd", controlPlane{
			NATSURLs: "nats://127.0.0.1:14222", LibvirtURI: "qemu+tls://virt1.example.internal/system",
			Extra: isolateTargets{{Prefix: netip.MustParsePrefix("203.0.113.0/24")}, {Host: "nats1.example.internal", Port: 8222}}},
			append(onHost(14222, 16509, 16514), "203.0.113.0/24", "198.51.100.11:8222"), "--libvirt-uri: resolve virt1.example.internal"},
		{"unresolvable NATS", controlPlane{NATSURLs: "nats://nowhere.example.internal:4222"}, nil, "resolve nowhere.example.internal"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.cp.deny(context.Background(), dns, host)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err %v, want one mentioning %q", err, tt.err)
				}
				if strings.Contains(err.Error(), "secret") {
					t.Errorf("error %q shows the URL's password", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var gotS []string
			for _, d := range got {
				gotS = append(gotS, d.String())
			}
			want := slices.Clone(tt.want)
			slices.Sort(want)
			slices.Sort(gotS)
			if !reflect.DeepEqual(gotS, want) {
				t.Errorf("deny\n got %v\nwant %v", gotS, want)
			}
		})
	}
}

func TestIsolationConfig(t *testing.T) {
	tests := []struct {
		name  string
		env   map[string]string
		file  string
		args  []string
		check func(t *testing.T, c Config, err error)
	}{
		{"on by default, unfiltered NICs warn", nil, "", nil, func(t *testing.T, c Config, err error) {
			if err != nil || !c.Isolation.IsolateGuests || c.Isolation.UnfilteredNICs != "warn" || len(c.Isolation.IsolateFrom) != 0 {
				t.Errorf("defaults %+v, %v", c.Isolation, err)
			}
		}},
		{"flags", nil, "", []string{"--isolate-guests=false", "--unfiltered-nics", "refuse", "--isolate-from", "192.0.2.9:22", "--isolate-from", "vault.example.internal"},
			func(t *testing.T, c Config, err error) {
				if err != nil || c.Isolation.IsolateGuests || c.Isolation.UnfilteredNICs != "refuse" || c.Isolation.IsolateFrom.String() != "192.0.2.9:22,vault.example.internal" {
					t.Errorf("%+v, %v", c.Isolation, err)
				}
			}},
		{"environment", map[string]string{"STRETCHY_ISOLATE_FROM": "198.51.100.0/24,[2001:db8::1]:443", "STRETCHY_UNFILTERED_NICS": "allow"}, "", nil,
			func(t *testing.T, c Config, err error) {
				if err != nil || c.Isolation.UnfilteredNICs != "allow" || c.Isolation.IsolateFrom.String() != "198.51.100.0/24,[2001:db8::1]:443" {
					t.Errorf("%+v, %v", c.Isolation, err)
				}
			}},
		{"config file", nil, "isolate-guests = false\nisolate-from = [\"192.0.2.1:8222\", \"192.0.2.5\"]\n", nil,
			func(t *testing.T, c Config, err error) {
				if err != nil || c.Isolation.IsolateGuests || c.Isolation.IsolateFrom.String() != "192.0.2.1:8222,192.0.2.5" {
					t.Errorf("%+v, %v", c.Isolation, err)
				}
			}},
		{"bad policy", map[string]string{"STRETCHY_UNFILTERED_NICS": "ignore"}, "", nil, func(t *testing.T, c Config, err error) {
			if err == nil || !strings.Contains(err.Error(), `--unfiltered-nics "ignore" (from STRETCHY_UNFILTERED_NICS): must be "warn", "refuse" or "allow"`) {
				t.Errorf("err %v", err)
			}
		}},
		{"bad destination", nil, "", []string{"--isolate-from", "192.0.2.1:99999"}, func(t *testing.T, c Config, err error) {
			if err == nil || !strings.Contains(err.Error(), `"192.0.2.1:99999" is not ADDR`) {
				t.Errorf("err %v", err)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			args := tt.args
			if tt.file != "" {
				args = append([]string{"--config", writeConfig(t, tt.file)}, args...)
			}
			c, _, err := loadConfig("worker run", args)
			tt.check(t, c, err)
		})
	}
}

func TestTestDriverHasNoIsolation(t *testing.T) {
	cfg := Config{LibvirtURI: "test:///tmp/node.xml", Isolation: isolationSettings{IsolateGuests: true, UnfilteredNICs: "warn"}}
	if iso := guestIsolation(cfg, nil); iso != nil {
		t.Errorf("test driver: isolation %+v, want none", iso)
	}
	cfg.LibvirtURI = "qemu:///system"
	if iso := guestIsolation(cfg, nil); iso == nil || iso.Filter != provision.GuestFilterName(cfg.Host) || iso.Unfiltered != provision.UnfilteredWarn {
		t.Errorf("qemu:///system: isolation %+v", iso)
	}
	cfg.Isolation.IsolateGuests = false
	if iso := guestIsolation(cfg, nil); iso != nil {
		t.Errorf("--isolate-guests=false: isolation %+v, want none", iso)
	}
}
