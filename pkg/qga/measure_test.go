package qga_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// measureRounds is how many times each step is timed.
const measureRounds = 10

// TestMeasure times the worker's agent steps through this package and
// through `virsh qemu-agent-command` processes and logs the medians. It
// boots ten guests, so it only runs with STRETCHY_QGA_MEASURE=1 (and -v to
// see the figures):
//
//	STRETCHY_QGA_MEASURE=1 go test -v -count=1 -run TestMeasure ./pkg/qga/
func TestMeasure(t *testing.T) {
	if os.Getenv("STRETCHY_QGA_MEASURE") != "1" {
		t.Skip("set STRETCHY_QGA_MEASURE=1 to measure")
	}
	virsh, err := exec.LookPath("virsh")
	if err != nil {
		t.Skipf("no virsh: %v", err)
	}
	l := connect(t)
	a := qga.New(l, qga.Options{})

	t.Run("agent_ready", func(t *testing.T) {
		// From the first guest-ping answer after boot to guest-info and
		// guest-get-osinfo done. Both ways run on each fresh guest, in
		// alternating order, so neither always gets the first call.
		var boot, client, cli []time.Duration
		for i := range measureRounds {
			g := newGuest(t, guestSpec{boot: true, agent: true})
			ctx := ctxFor(t, bootTimeout)
			if err := a.WaitReady(ctx, g.name); err != nil {
				t.Fatal(err)
			}
			boot = append(boot, time.Since(g.started))
			viaClient := func() {
				start := time.Now()
				if _, err := a.Info(ctx, g.name); err != nil {
					t.Fatal(err)
				}
				if _, err := a.OSInfo(ctx, g.name); err != nil {
					t.Fatal(err)
				}
				client = append(client, time.Since(start))
			}
			viaVirsh := func() {
				start := time.Now()
				agentCommand(t, virsh, g.name, "guest-info", nil)
				agentCommand(t, virsh, g.name, "guest-get-osinfo", nil)
				cli = append(cli, time.Since(start))
			}
			if i%2 == 0 {
				viaClient()
				viaVirsh()
			} else {
				viaVirsh()
				viaClient()
			}
			if err := g.remove(); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("boot to agent ready: median %v of %d (%v)", median(boot), len(boot), boot)
		t.Logf("agent_ready (guest-info + guest-get-osinfo): qga median %v, virsh median %v", median(client), median(cli))
	})

	t.Run("runner_start", func(t *testing.T) {
		// Write a file from stdin with umask 077, chmod it, start a
		// process and read its first status: what starting a runner
		// takes.
		g := sharedGuest(t)
		ctx := ctxFor(t, 5*time.Minute)
		secret := []byte("measure-secret-" + randomHex(8) + "\n")
		var client, cli []time.Duration
		for i := range measureRounds {
			file := fmt.Sprintf("/tmp/qga-measure-%d", i)
			write := qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", "umask 077; cat > " + file}, Stdin: secret}
			chmod := qga.ExecRequest{Path: "/bin/chmod", Args: []string{"0400", file}}
			proc := qga.ExecRequest{Path: "/bin/sleep", Args: []string{"2"}}

			start := time.Now()
			for _, req := range []qga.ExecRequest{write, chmod} {
				if _, err := a.Run(ctx, g.name, req); err != nil {
					t.Fatal(err)
				}
			}
			pid, err := a.Start(ctx, g.name, proc)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := a.Status(ctx, g.name, pid); err != nil {
				t.Fatal(err)
			}
			client = append(client, time.Since(start))

			start = time.Now()
			virshRun(t, virsh, g.name, write)
			virshRun(t, virsh, g.name, chmod)
			pid = virshStart(t, virsh, g.name, proc)
			agentCommand(t, virsh, g.name, "guest-exec-status", map[string]int{"pid": pid})
			cli = append(cli, time.Since(start))
		}
		t.Logf("runner_start (write file from stdin, chmod, start + first status): qga median %v, virsh median %v", median(client), median(cli))
		t.Logf("qga %v", client)
		t.Logf("virsh %v", cli)
	})
}

// agentCommand runs one agent command in a virsh process and returns its
// return value.
func agentCommand(t *testing.T, virsh, domain, name string, args any) json.RawMessage {
	t.Helper()
	cmd := map[string]any{"execute": name}
	if args != nil {
		cmd["arguments"] = args
	}
	b, err := json.Marshal(cmd)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, virsh, "-c", "qemu:///system", "qemu-agent-command", domain, string(b), "--timeout", "10").Output()
	if err != nil {
		t.Fatalf("virsh qemu-agent-command %s %s: %v", domain, name, err)
	}
	var r struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("virsh %s reply: %v", name, err)
	}
	return r.Return
}

// virshStart is guest-exec through virsh.
func virshStart(t *testing.T, virsh, domain string, req qga.ExecRequest) int {
	t.Helper()
	args := map[string]any{"path": req.Path, "arg": req.Args}
	if len(req.Stdin) > 0 {
		args["input-data"] = base64.StdEncoding.EncodeToString(req.Stdin)
	}
	var r struct {
		PID int `json:"pid"`
	}
	if err := json.Unmarshal(agentCommand(t, virsh, domain, "guest-exec", args), &r); err != nil {
		t.Fatal(err)
	}
	return r.PID
}

// virshRun is guest-exec and then guest-exec-status until the program
// exits, each a virsh process, back to back.
func virshRun(t *testing.T, virsh, domain string, req qga.ExecRequest) {
	t.Helper()
	pid := virshStart(t, virsh, domain, req)
	for {
		var st struct {
			Exited   bool `json:"exited"`
			ExitCode int  `json:"exitcode"`
		}
		if err := json.Unmarshal(agentCommand(t, virsh, domain, "guest-exec-status", map[string]int{"pid": pid}), &st); err != nil {
			t.Fatal(err)
		}
		if st.Exited {
			if st.ExitCode != 0 {
				t.Fatalf("%s exited %d", req.Path, st.ExitCode)
			}
			return
		}
	}
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2].Round(time.Millisecond / 10)
	}
	return ((s[len(s)/2-1] + s[len(s)/2]) / 2).Round(time.Millisecond / 10)
}
