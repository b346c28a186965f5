package bench

import (
	"context"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Machine describes where and when the benchmarks ran.
type Machine struct {
	Date                time.Time
	Commit              string
	Dirty               bool
	CPU                 string
	Cores               int
	Memory              string
	OS, Kernel          string
	Libvirt, QEMU, Go   string
	LoadStart, LoadEnd  string
	OtherDomainsAtStart []string
	OtherDomainsAtEnd   []string
}

// describeMachine reads the machine's description; what it cannot read
// stays empty.
func describeMachine(ctx context.Context, root string) Machine {
	m := Machine{Date: time.Now().UTC(), Cores: runtime.NumCPU(), Go: runtime.Version()}
	m.Commit = command(ctx, root, "git", "rev-parse", "--short=12", "HEAD")
	m.Dirty = command(ctx, root, "git", "status", "--porcelain", "--untracked-files=no") != ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if st, err := procMeminfo(); err == nil {
		m.Memory = st
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "PRETTY_NAME="); ok {
				m.OS = strings.Trim(v, `"`)
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	for _, l := range strings.Split(command(ctx, root, "virsh", "-c", "qemu:///system", "version"), "\n") {
		if v, ok := strings.CutPrefix(l, "Using library: "); ok {
			m.Libvirt = v
		}
		if v, ok := strings.CutPrefix(l, "Running hypervisor: "); ok {
			m.QEMU = v
		}
	}
	m.LoadStart = loadAverage()
	m.OtherDomainsAtStart = runningDomains(ctx)
	return m
}

// finish records the machine's state at the end.
func (m *Machine) finish(ctx context.Context) {
	m.LoadEnd = loadAverage()
	m.OtherDomainsAtEnd = runningDomains(ctx)
}

func command(ctx context.Context, dir, name string, args ...string) string {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(out))
}

func procMeminfo() (string, error) {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "MemTotal:"); ok {
			f := strings.Fields(v)
			if len(f) == 2 && f[1] == "kB" {
				kb, err := strconv.ParseFloat(f[0], 64)
				if err != nil {
					return "", err
				}
				return formatGiB(kb * 1024), nil
			}
		}
	}
	return "", nil
}

func formatGiB(b float64) string { return format(b/(1<<30), 1) + " GiB" }

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// runningDomains lists the running domains of qemu:///system: other
// people's guests while the benchmark runs, when it does not run its own.
func runningDomains(ctx context.Context) []string {
	var out []string
	for _, l := range strings.Split(command(ctx, "", "virsh", "-q", "-c", "qemu:///system", "list", "--name"), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}
