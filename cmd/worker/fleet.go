package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/user"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

const hostsUsage = `usage: worker hosts [--json] [--nats-url U]

Lists the hosts of the fleet from the host registry: state, version,
slots, machines, images and free space of their pools, and how long ago
each wrote its record. A drained host whose worker is not running is
listed with state "drained (down)". --json prints one JSON array.
`

const drainUsage = `usage: worker drain <host> [--by WHO] [--nats-url U]
       worker undrain <host> [--nats-url U]

drain asks the worker of <host> to take no more provisions; it keeps its
machines and serves their teardowns, and its record shows "draining",
then "drained" once it has no machine left. The request is kept in NATS,
so it works with the host's worker down and lasts across its restarts,
until undrain. SIGUSR1 to a worker drains its own host (SIGUSR2 undrains).
`

// operatorConn connects an operator's command, whose calls the returned
// context bounds.
func operatorConn(ctx context.Context, nf natsFlags) (*client.Client, context.Context, func(), error) {
	c, err := nf.client("stretchy-libvirt-worker client")
	if err != nil {
		return nil, nil, nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	return c, ctx, func() {
		cancel()
		c.Close()
	}, nil
}

func hostsCommand(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("worker hosts", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), hostsUsage); fs.PrintDefaults() }
	var nf natsFlags
	nf.register(fs, operatorRole)
	asJSON := fs.Bool("json", false, "print a JSON array instead of a table")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, ctx, done, err := operatorConn(ctx, nf)
	if err != nil {
		return err
	}
	defer done()
	hosts, err := c.Hosts(ctx)
	if err != nil {
		return err
	}
	drains, err := c.Drains(ctx)
	if err != nil {
		return err
	}
	rows := hostRows(hosts, drains)
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	return printHosts(os.Stdout, rows, time.Now())
}

// hostRow is one host as worker hosts shows it.
type hostRow struct {
	messages.Host
	// Down is set for a drained host without a record (its worker is not
	// running).
	Down bool `json:"down,omitempty"`
	// DrainedBy and DrainedAt tell who asked for the drain, if anybody.
	DrainedBy string    `json:"drained_by,omitempty"`
	DrainedAt time.Time `json:"drained_at,omitzero"`
}

func hostRows(hosts []messages.Host, drains []messages.Drain) []hostRow {
	var rows []hostRow
	byHost := map[string]messages.Drain{}
	for _, d := range drains {
		byHost[d.Host] = d
	}
	for _, h := range hosts {
		r := hostRow{Host: h}
		if d, ok := byHost[h.Host]; ok {
			r.DrainedBy, r.DrainedAt = d.By, d.At
			delete(byHost, h.Host)
		}
		rows = append(rows, r)
	}
	for _, d := range byHost {
		rows = append(rows, hostRow{Host: messages.Host{Host: d.Host, State: messages.HostDrained}, Down: true,
			DrainedBy: d.By, DrainedAt: d.At})
	}
	slices.SortFunc(rows, func(a, b hostRow) int { return strings.Compare(a.Host.Host, b.Host.Host) })
	return rows
}

func printHosts(w io.Writer, rows []hostRow, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOST\tSTATE\tVERSION\tSLOTS\tMACHINES\tIMAGES\tPOOLS FREE\tSEEN")
	for _, r := range rows {
		state := string(r.State)
		if r.Down {
			state += " (down)"
		}
		var images []string
		for _, i := range r.Images {
			s := i.Name
			if !i.Admitted {
				s += "(no space)"
			}
			images = append(images, s)
		}
		var pools []string
		for _, p := range r.Pools {
			s := p.Name + " " + gib(p.FreeBytes)
			if p.Low {
				s += " LOW"
			}
			pools = append(pools, s)
		}
		seen, slots, machines, version := "-", "-", "-", r.Version
		if !r.Down {
			seen = now.Sub(r.Heartbeat).Round(time.Second).String() + " ago"
			slots = fmt.Sprintf("%d/%d", r.SlotsInUse, r.SlotsTotal)
			machines = fmt.Sprintf("%d/%d", r.MachinesRunning, r.MachinesMax)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Host.Host, state, dash(version), slots, machines,
			dash(strings.Join(images, ",")), dash(strings.Join(pools, ", ")), seen)
	}
	return tw.Flush()
}

func drainCommand(ctx context.Context, args []string, drain bool) error {
	name := "worker undrain"
	if drain {
		name = "worker drain"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), drainUsage); fs.PrintDefaults() }
	var nf natsFlags
	nf.register(fs, operatorRole)
	by := fs.String("by", defaultBy(), "who asks, recorded with the drain")
	// The host comes first, flags after it, or the other way round.
	var host string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		host, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if host == "" && fs.NArg() == 1 {
		host = fs.Arg(0)
	} else if fs.NArg() > 0 || host == "" {
		return errors.New(strings.SplitN(drainUsage, "\n\n", 2)[0])
	}
	c, ctx, done, err := operatorConn(ctx, nf)
	if err != nil {
		return err
	}
	defer done()
	if drain {
		err = c.Drain(ctx, host, *by)
	} else {
		err = c.Undrain(ctx, host)
	}
	if err != nil {
		return err
	}
	if drain {
		fmt.Printf("host %s drains: it takes no provisions from now on (worker hosts shows when it is drained)\n", host)
	} else {
		fmt.Printf("host %s takes provisions again\n", host)
	}
	return nil
}

func defaultBy() string {
	name := "unknown"
	if u, err := user.Current(); err == nil {
		name = u.Username
	}
	h, _ := os.Hostname()
	return name + "@" + h
}

const configUsage = `usage: worker config [worker run flags]

Prints the configuration "worker run" would start with, from its flags,
environment variables (STRETCHY_...) and config file (--config or
STRETCHY_CONFIG), in this order of precedence over the defaults, as a
TOML file that --config accepts. Credentials in URLs are masked; secrets
(STRETCHY_NATS_PASSWORD, STRETCHY_NATS_TOKEN) are never printed. An
invalid value from any source is an error naming it.
`

func configCommand(args []string) error {
	if slices.Contains(args, "-h") || slices.Contains(args, "--help") || slices.Contains(args, "-help") {
		fmt.Fprint(os.Stderr, configUsage)
	}
	_, fs, err := loadConfig("worker config", args)
	if err != nil {
		return err
	}
	return printConfig(os.Stdout, fs)
}

// printConfig writes every setting of fs but --config as TOML.
func printConfig(w io.Writer, fs *flag.FlagSet) error {
	var b strings.Builder
	b.WriteString("# worker run's effective configuration (flag, then environment, then file, then default)\n")
	fs.VisitAll(func(f *flag.Flag) {
		if f.Name == "config" {
			return
		}
		v := f.Value.String()
		switch x := f.Value.(type) {
		case listValue:
			var items []string
			for _, p := range x.items() {
				items = append(items, tomlString(p))
			}
			fmt.Fprintf(&b, "%s = [%s]\n", f.Name, strings.Join(items, ", "))
			return
		case flag.Getter:
			switch x.Get().(type) {
			case int, bool:
				fmt.Fprintf(&b, "%s = %s\n", f.Name, v)
				return
			}
		}
		if f.Name == "nats-url" {
			v = redactURL(v)
		}
		fmt.Fprintf(&b, "%s = %s\n", f.Name, tomlString(v))
	})
	_, err := io.WriteString(w, b.String())
	return err
}

// tomlString quotes s as a TOML basic string.
func tomlString(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"' || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, "\\u%04X", r)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte('"')
	return b.String()
}
