package main

import (
	"errors"
	"flag"
	"fmt"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Config is everything "worker run" is configured with, from flags and
// environment variables.
type Config struct {
	Host           string
	NATSURL        string
	NATS           NATSAuth
	NATSDataDir    string
	NATSPort       int
	LibvirtURI     string
	DomainType     string
	Parallelism    int
	MaxVMs         int
	AckWait        time.Duration
	MaxDeliver     int
	EventsMaxAge   time.Duration
	RequestsMaxAge time.Duration
	Replicas       int
	ShutdownGrace  time.Duration
	LogFormat      string
	LogLevel       string
}

// env-backed flag helpers: the environment sets the default, the flag wins.
func envString(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

func envInt(name string, def int) int {
	if v, ok := os.LookupEnv(name); ok {
		if n, err := strconv.Atoi(v); err == nil {
			return n
		}
	}
	return def
}

func envDuration(name string, def time.Duration) time.Duration {
	if v, ok := os.LookupEnv(name); ok {
		if d, err := time.ParseDuration(v); err == nil {
			return d
		}
	}
	return def
}

var nonHostChars = regexp.MustCompile(`[^A-Za-z0-9_-]+`)

// defaultHost derives a host id from the machine's host name.
func defaultHost() string {
	h, _ := os.Hostname()
	h, _, _ = strings.Cut(h, ".")
	h = strings.Trim(nonHostChars.ReplaceAllString(h, "-"), "-_")
	if h == "" {
		h = "localhost"
	}
	if len(h) > 64 {
		h = h[:64]
	}
	return h
}

func (c *Config) register(fs *flag.FlagSet) {
	fs.StringVar(&c.Host, "host", envString("STRETCHY_HOST", defaultHost()), "host id: names this host's subjects and appears in events (STRETCHY_HOST)")
	fs.StringVar(&c.NATSURL, "nats-url", envString("STRETCHY_NATS_URL", ""), "NATS server or cluster URL(s), comma separated; empty starts an embedded server (STRETCHY_NATS_URL)")
	c.NATS.register(fs)
	fs.StringVar(&c.NATSDataDir, "nats-data-dir", envString("STRETCHY_NATS_DATA_DIR", "/var/lib/stretchy-worker/nats"), "JetStream directory of the embedded server (STRETCHY_NATS_DATA_DIR)")
	fs.IntVar(&c.NATSPort, "nats-port", envInt("STRETCHY_NATS_PORT", 4222), "loopback port of the embedded server (STRETCHY_NATS_PORT)")
	fs.StringVar(&c.LibvirtURI, "libvirt-uri", envString("STRETCHY_LIBVIRT_URI", "qemu:///system"), "libvirt connection URI, as for virsh -c: qemu:///system, or qemu+tls://, qemu+ssh://, qemu+tcp:// for a remote host (STRETCHY_LIBVIRT_URI)")
	fs.StringVar(&c.DomainType, "domain-type", envString("STRETCHY_DOMAIN_TYPE", ""), `libvirt domain type of clones: "kvm", "qemu" (TCG, no hardware virtualization) or empty to keep the image's (STRETCHY_DOMAIN_TYPE)`)
	fs.IntVar(&c.Parallelism, "parallelism", envInt("STRETCHY_PARALLELISM", 3), "concurrent start/stop operations (STRETCHY_PARALLELISM)")
	fs.IntVar(&c.MaxVMs, "max-vms", envInt("STRETCHY_MAX_VMS", 8), "machines this host runs at most (STRETCHY_MAX_VMS)")
	fs.DurationVar(&c.AckWait, "ack-wait", envDuration("STRETCHY_ACK_WAIT", 30*time.Second), "time a request may go unacknowledged before another worker gets it (STRETCHY_ACK_WAIT)")
	fs.IntVar(&c.MaxDeliver, "max-deliver", envInt("STRETCHY_MAX_DELIVER", 5), "deliveries of one request before it is given up (STRETCHY_MAX_DELIVER)")
	fs.DurationVar(&c.EventsMaxAge, "events-max-age", envDuration("STRETCHY_EVENTS_MAX_AGE", 30*24*time.Hour), "how long the event stream keeps events (STRETCHY_EVENTS_MAX_AGE)")
	fs.DurationVar(&c.RequestsMaxAge, "requests-max-age", envDuration("STRETCHY_REQUESTS_MAX_AGE", 24*time.Hour), "how long a request waits for a worker before it is dropped (STRETCHY_REQUESTS_MAX_AGE)")
	fs.IntVar(&c.Replicas, "replicas", envInt("STRETCHY_REPLICAS", 1), "stream replicas in a clustered NATS (STRETCHY_REPLICAS)")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", envDuration("STRETCHY_SHUTDOWN_GRACE", 60*time.Second), "time operations in flight get to finish on SIGTERM (STRETCHY_SHUTDOWN_GRACE)")
	fs.StringVar(&c.LogFormat, "log-format", envString("STRETCHY_LOG_FORMAT", "text"), `"text" or "json" (STRETCHY_LOG_FORMAT)`)
	fs.StringVar(&c.LogLevel, "log-level", envString("STRETCHY_LOG_LEVEL", "info"), `"debug", "info", "warn" or "error" (STRETCHY_LOG_LEVEL)`)
}

// Validate fails fast, naming the setting at fault.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !messages.ValidHost(c.Host) {
		bad("--host %q: must be 1-64 characters of A-Z a-z 0-9 _ - (it is a NATS subject token)", c.Host)
	}
	if c.NATSURL == "" && c.NATSDataDir == "" {
		bad("--nats-data-dir: needed for the embedded server when --nats-url is empty")
	}
	if given := c.NATS.given(); c.NATSURL == "" && len(given) > 0 {
		bad("%s: needs --nats-url; the embedded server takes no credentials or TLS", strings.Join(given, ", "))
	} else if err := c.NATS.Validate(c.NATSURL); err != nil {
		errs = append(errs, err)
	}
	if c.NATSPort < 1 || c.NATSPort > 65535 {
		bad("--nats-port %d: not a TCP port", c.NATSPort)
	}
	if u, err := url.Parse(c.LibvirtURI); err != nil || u.Scheme == "" {
		bad("--libvirt-uri %q: not a libvirt URI such as qemu:///system", c.LibvirtURI)
	}
	switch c.DomainType {
	case "", "kvm", "qemu":
	default:
		bad(`--domain-type %q: must be "kvm", "qemu" or empty`, c.DomainType)
	}
	if c.Parallelism < 1 {
		bad("--parallelism %d: must be at least 1", c.Parallelism)
	}
	if c.MaxVMs < 1 {
		bad("--max-vms %d: must be at least 1", c.MaxVMs)
	}
	if c.AckWait < 3*time.Second {
		bad("--ack-wait %s: must be at least 3s", c.AckWait)
	}
	if c.MaxDeliver < 1 {
		bad("--max-deliver %d: must be at least 1", c.MaxDeliver)
	}
	if c.EventsMaxAge < time.Minute {
		bad("--events-max-age %s: must be at least 1m", c.EventsMaxAge)
	}
	if c.RequestsMaxAge < time.Minute {
		bad("--requests-max-age %s: must be at least 1m", c.RequestsMaxAge)
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		bad("--replicas %d: must be between 1 and 5", c.Replicas)
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		bad(`--log-format %q: must be "text" or "json"`, c.LogFormat)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad(`--log-level %q: must be debug, info, warn or error`, c.LogLevel)
	}
	return errors.Join(errs...)
}
