package main

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/nats-io/nats.go"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// Config is everything "worker run" is configured with. Each setting has
// a flag; the same setting comes from the environment variable named in
// the flag's help (STRETCHY_ and the flag's name in capitals, - as _), and
// from the optional TOML config file (--config, STRETCHY_CONFIG), whose
// keys are the flags' names. A flag wins over the environment, the
// environment over the file, the file over the default (loadConfig).
type Config struct {
	ConfigFile string
	// from says where each setting came from, for Validate's messages:
	// an environment variable, "config file F, key K" or sourceDefault;
	// a setting from its flag has none. loadConfig fills it.
	from map[string]string

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
	Images         patterns
	MinFreeSpace   byteSize
	Warm           warmPools
	WarmMaxAge     time.Duration
	WarmRetire     bool
	// KeysDir holds the keys sealed runner secrets are opened with;
	// RequireSealed refuses secrets in the clear (docs/protocol.md 3.13).
	KeysDir       string
	RequireSealed bool
	HTTPAddr      string
	LogFormat     string
	LogLevel      string
	// Bounds on the size of machines (docs/protocol.md 3.2): vCPUs and
	// MiB of memory of one machine, and of all of the host's machines
	// together; 0 is no bound.
	MaxVCPUsPerMachine  int
	MaxMemoryPerMachine int
	HostVCPUs           int
	HostMemory          int
	// MaxScratchGiB bounds a machine's scratch disk (docs/protocol.md
	// 7.6); 0 is no bound.
	MaxScratchGiB int
	// ConsoleDir is where machines' serial consoles log to, on the
	// libvirt host (docs/protocol.md 7.7); empty captures none.
	ConsoleDir string
	// MaxHold caps how long a machine is held after its job failed
	// (hold_on_failure_s) or on an operator's request; 0 holds none.
	MaxHold time.Duration

	// InboxPrefix is the prefix of the worker's inboxes; empty is
	// bus.WorkerInbox(Host) (workerInbox).
	InboxPrefix string
	// OperatorInboxPrefix is the operators' inbox prefix: control
	// requests are answered only on reply subjects under it.
	OperatorInboxPrefix string
	// Isolation keeps guests from the control plane and each other
	// (isolation.go, docs/security.md 4).
	Isolation isolationSettings
}

// env-backed flag defaults, for the commands other than run: the
// environment sets the default, the flag wins.
func envString(name, def string) string {
	if v, ok := os.LookupEnv(name); ok {
		return v
	}
	return def
}

// envOf names the environment variable of a flag.
func envOf(flagName string) string {
	if flagName == "nats-nkey-seed" {
		return "STRETCHY_NATS_NKEY_SEED_FILE"
	}
	return "STRETCHY_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// listValue is a setting of several values: a flag repeated or comma
// separated, a variable comma separated, a TOML array of strings (or one
// string, comma separated) in the config file.
type listValue interface {
	flag.Value
	// reset empties the list, so that a source replaces the default
	// rather than adding to it.
	reset()
	// items are the values, as Set takes them one by one.
	items() []string
}

// patterns is a list of shell patterns.
type patterns []string

func (p *patterns) String() string { return strings.Join(*p, ",") }

func (p *patterns) reset() { *p = nil }

func (p *patterns) items() []string { return slices.Clone(*p) }

func (p *patterns) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		if _, err := path.Match(s, ""); err != nil {
			return fmt.Errorf("pattern %q: %w", s, err)
		}
		*p = append(*p, s)
	}
	return nil
}

// warmPools are the warm pools of a host: a list of image=N.
type warmPools map[string]int

func (w *warmPools) String() string { return strings.Join(w.items(), ",") }

func (w *warmPools) reset() { *w = nil }

func (w *warmPools) items() []string {
	var parts []string
	for image, n := range *w {
		parts = append(parts, fmt.Sprintf("%s=%d", image, n))
	}
	slices.Sort(parts)
	return parts
}

func (w warmPools) total() int {
	n := 0
	for _, c := range w {
		n += c
	}
	return n
}

func (w *warmPools) Set(v string) error {
	if *w == nil {
		*w = warmPools{}
	}
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		image, count, ok := strings.Cut(s, "=")
		n, err := strconv.Atoi(count)
		if !ok || err != nil || n < 0 || n > 64 || !messages.ValidImage(image) {
			return fmt.Errorf("%q is not image=N, an image name and 0 to 64 machines", s)
		}
		(*w)[image] = n
	}
	return nil
}

// byteSize is a size in bytes written as 2GiB, 500MiB, 1TB or 1073741824.
type byteSize uint64

var sizeUnits = []struct {
	suffix string
	n      uint64
}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"TB", 1e12}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}, {"B", 1}}

func (b *byteSize) String() string {
	for _, u := range sizeUnits[:4] {
		if *b != 0 && uint64(*b)%u.n == 0 {
			return fmt.Sprintf("%d%s", uint64(*b)/u.n, u.suffix)
		}
	}
	return strconv.FormatUint(uint64(*b), 10)
}

func (b *byteSize) Set(v string) error {
	v = strings.TrimSpace(v)
	mult := uint64(1)
	for _, u := range sizeUnits {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			v, mult = strings.TrimSpace(n), u.n
			break
		}
	}
	n, err := strconv.ParseUint(v, 10, 64)
	if err != nil || (mult > 1 && n > ^uint64(0)/mult) {
		return fmt.Errorf("%q is not a size such as 2GiB, 500MiB or 1073741824", v)
	}
	*b = byteSize(n * mult)
	return nil
}

// Defaults of settings that are not plain literals.
const (
	defaultMinFreeSpace = byteSize(2 << 30)
	defaultConsoleDir   = "/var/log/stretchy-worker/console"
	// maxMaxHold bounds --max-hold, as max_lifetime_s is bounded.
	maxMaxHold = 7 * 24 * time.Hour
)

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
	fs.StringVar(&c.ConfigFile, "config", "", "TOML file of settings, keys named like these flags; flags and environment variables win over it (STRETCHY_CONFIG)")
	fs.StringVar(&c.Host, "host", defaultHost(), "host id: names this host's subjects and appears in events (STRETCHY_HOST)")
	fs.StringVar(&c.NATSURL, "nats-url", "", "NATS server or cluster URL(s), comma separated; empty starts an embedded server (STRETCHY_NATS_URL)")
	c.NATS.register(fs)
	fs.StringVar(&c.InboxPrefix, "inbox-prefix", "", "prefix of the worker's inboxes, where the replies to its requests arrive; its NATS user must be allowed to subscribe to PREFIX.>; "+
		"empty: "+bus.WorkerInbox("<host>")+" (STRETCHY_INBOX_PREFIX)")
	fs.StringVar(&c.OperatorInboxPrefix, "operator-inbox-prefix", client.OperatorInbox, "inbox prefix of the operators' commands (worker hold, release, console): "+
		"a control request is answered only on a reply subject under it, which must be under _INBOX. (STRETCHY_OPERATOR_INBOX_PREFIX)")
	fs.StringVar(&c.NATSDataDir, "nats-data-dir", defaultNATSDataDir, "directory of the embedded server: its JetStream data, and its credentials, made at first start (STRETCHY_NATS_DATA_DIR)")
	fs.IntVar(&c.NATSPort, "nats-port", 4222, "loopback port of the embedded server (STRETCHY_NATS_PORT)")
	fs.StringVar(&c.LibvirtURI, "libvirt-uri", "qemu:///system", "libvirt connection URI, as for virsh -c: qemu:///system, or qemu+tls://, qemu+ssh://, qemu+tcp:// for a remote host (STRETCHY_LIBVIRT_URI)")
	fs.StringVar(&c.DomainType, "domain-type", "", `libvirt domain type of clones: "kvm", "qemu" (TCG, no hardware virtualization) or empty to keep the image's (STRETCHY_DOMAIN_TYPE)`)
	fs.IntVar(&c.Parallelism, "parallelism", 3, "concurrent start/stop operations (STRETCHY_PARALLELISM)")
	fs.IntVar(&c.MaxVMs, "max-vms", 8, "machines this host runs at most (STRETCHY_MAX_VMS)")
	fs.DurationVar(&c.AckWait, "ack-wait", 30*time.Second, "time a request may go unacknowledged before another worker gets it (STRETCHY_ACK_WAIT)")
	fs.IntVar(&c.MaxDeliver, "max-deliver", 5, "deliveries of one request before it is given up (STRETCHY_MAX_DELIVER)")
	fs.DurationVar(&c.EventsMaxAge, "events-max-age", 30*24*time.Hour, "how long the event stream keeps events (STRETCHY_EVENTS_MAX_AGE)")
	fs.DurationVar(&c.RequestsMaxAge, "requests-max-age", 24*time.Hour, "how long a request waits for a worker before it is dropped (STRETCHY_REQUESTS_MAX_AGE)")
	fs.IntVar(&c.Replicas, "replicas", 1, "replicas of the streams and buckets in a clustered NATS: 3 for a 3-node cluster (STRETCHY_REPLICAS)")
	fs.DurationVar(&c.ShutdownGrace, "shutdown-grace", 60*time.Second, "time operations in flight get to finish on SIGTERM (STRETCHY_SHUTDOWN_GRACE)")
	fs.Var(&c.Images, "images", "shell patterns of the image domains this host serves, comma separated or repeated; default every valid image (STRETCHY_IMAGES)")
	c.MinFreeSpace = defaultMinFreeSpace
	fs.Var(&c.MinFreeSpace, "min-free-space", "free space every pool of an image needs for this host to clone it, such as 2GiB (STRETCHY_MIN_FREE_SPACE)")
	fs.Var(&c.Warm, "warm", "warm pools: image=N keeps N machines of the image booted and idle for jobs, comma separated or repeated (STRETCHY_WARM)")
	fs.DurationVar(&c.WarmMaxAge, "warm-max-age", time.Hour, "an idle warm machine this old is replaced; 0 keeps it (STRETCHY_WARM_MAX_AGE)")
	fs.StringVar(&c.KeysDir, "keys-dir", defaultKeysDir, "directory of the keys sealed runner secrets are opened with (worker keys); a missing directory holds none (STRETCHY_KEYS_DIR)")
	fs.BoolVar(&c.RequireSealed, "require-sealed-secrets", false, "refuse provisions whose runner secret is in the clear (secret_not_sealed); needs a key in --keys-dir (STRETCHY_REQUIRE_SEALED_SECRETS)")
	fs.BoolVar(&c.WarmRetire, "warm-retire-on-stop", false, "remove the idle warm machines when the worker stops; otherwise the next start replaces them (STRETCHY_WARM_RETIRE_ON_STOP)")
	fs.StringVar(&c.HTTPAddr, "http-addr", "", "address for /metrics, /healthz and /readyz, such as 127.0.0.1:9464; empty serves none (STRETCHY_HTTP_ADDR)")
	fs.StringVar(&c.LogFormat, "log-format", "text", `"text" or "json" (STRETCHY_LOG_FORMAT)`)
	fs.StringVar(&c.LogLevel, "log-level", "info", `"debug", "info", "warn" or "error" (STRETCHY_LOG_LEVEL)`)
	fs.IntVar(&c.MaxVCPUsPerMachine, "max-vcpus-per-machine", 0, "vCPUs one machine may have, the request's or its image's; more is refused (resources_exceeded); 0: no bound (STRETCHY_MAX_VCPUS_PER_MACHINE)")
	fs.IntVar(&c.MaxMemoryPerMachine, "max-memory-per-machine", 0, "MiB of memory one machine may have, the request's or its image's; more is refused (resources_exceeded); 0: no bound (STRETCHY_MAX_MEMORY_PER_MACHINE)")
	fs.IntVar(&c.HostVCPUs, "host-vcpus", 0, "vCPUs this host's machines may have together; a request that does not fit waits; 0: no bound (STRETCHY_HOST_VCPUS)")
	fs.IntVar(&c.HostMemory, "host-memory", 0, "MiB of memory this host's machines may have together; a request that does not fit waits; 0: no bound (STRETCHY_HOST_MEMORY)")
	fs.IntVar(&c.MaxScratchGiB, "max-scratch-gib", 100, "GiB of scratch disk (scratch_disk_gib) one machine may have; more is refused (resources_exceeded); 0: no bound (STRETCHY_MAX_SCRATCH_GIB)")
	fs.StringVar(&c.ConsoleDir, "console-dir", defaultConsoleDir, "absolute directory for the machines' serial console logs, on the libvirt host; empty captures no consoles (STRETCHY_CONSOLE_DIR)")
	fs.DurationVar(&c.MaxHold, "max-hold", time.Hour, "longest a machine is held after its job failed (hold_on_failure_s) or by worker hold; 0 holds none (STRETCHY_MAX_HOLD)")
	c.Isolation.register(fs)
}

// noFileKeys are flags the config file cannot set.
var noFileKeys = map[string]bool{"config": true}

// natsAuthFlags are the flags NATSAuth registers.
var natsAuthFlags = []string{"nats-user", "nats-password-file", "nats-token-file", "nats-nkey-seed",
	"nats-creds", "nats-tls-ca", "nats-tls-cert", "nats-tls-key"}

// loadConfig fills cfg from args, the environment and the config file, in
// that order of precedence, and validates it. Every value goes through its
// flag's parser, so an invalid one stops the worker whatever its source,
// with a message naming the source: the flag, the variable, or the file
// and key.
func loadConfig(name string, args []string) (Config, *flag.FlagSet, error) {
	var cfg Config
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	cfg.register(fs)
	// NATSAuth seeds its flags from the environment, as the other
	// commands want; here they start empty, so that every source is
	// applied in the same order.
	for _, name := range natsAuthFlags {
		_ = fs.Lookup(name).Value.Set("")
	}
	if err := fs.Parse(args); err != nil {
		return cfg, fs, err
	}
	if fs.NArg() > 0 {
		return cfg, fs, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	if !given["config"] {
		if v, ok := os.LookupEnv("STRETCHY_CONFIG"); ok {
			cfg.ConfigFile = v
		}
	}
	cfg.from = map[string]string{}
	file := map[string]any{}
	if cfg.ConfigFile != "" {
		if _, err := toml.DecodeFile(cfg.ConfigFile, &file); err != nil {
			return cfg, fs, fmt.Errorf("config file %s: %w", cfg.ConfigFile, err)
		}
		for key := range file {
			if f := fs.Lookup(key); f == nil || noFileKeys[key] {
				errs = append(errs, fmt.Errorf("config file %s: unknown setting %q (settings are named like the flags of worker run -h)", cfg.ConfigFile, key))
			}
		}
	}
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] || f.Name == "config" {
			return
		}
		if v, ok := os.LookupEnv(envOf(f.Name)); ok {
			cfg.from[f.Name] = envOf(f.Name)
			if err := resetAndSet(f, v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: invalid value for --%s: %w", envOf(f.Name), v, f.Name, err))
			}
			return
		}
		v, ok := file[f.Name]
		if !ok {
			cfg.from[f.Name] = sourceDefault
			return
		}
		cfg.from[f.Name] = fmt.Sprintf("config file %s, key %s", cfg.ConfigFile, f.Name)
		if err := setFromFile(f, v); err != nil {
			errs = append(errs, fmt.Errorf("config file %s: %s = %s: invalid value: %w", cfg.ConfigFile, f.Name, fileValue(v), err))
		}
	})
	// The secrets of NATSAuth come from the environment only.
	cfg.NATS.Password = secret(os.Getenv("STRETCHY_NATS_PASSWORD"))
	cfg.NATS.Token = secret(os.Getenv("STRETCHY_NATS_TOKEN"))
	if err := errors.Join(errs...); err != nil {
		return cfg, fs, err
	}
	return cfg, fs, cfg.Validate()
}

// resetAndSet sets a flag from one string, replacing (not adding to) a
// list's default.
func resetAndSet(f *flag.Flag, v string) error {
	if l, ok := f.Value.(listValue); ok {
		l.reset()
	}
	if err := f.Value.Set(v); err != nil {
		return plainError(err)
	}
	return nil
}

// setFromFile sets a flag from a TOML value: strings as written (a
// duration as "30s", a size as "2GiB"), integers, booleans, and arrays of
// strings for lists (listValue).
func setFromFile(f *flag.Flag, v any) error {
	switch x := v.(type) {
	case string:
		return resetAndSet(f, x)
	case int64:
		return resetAndSet(f, strconv.FormatInt(x, 10))
	case bool:
		return resetAndSet(f, strconv.FormatBool(x))
	case []any:
		l, ok := f.Value.(listValue)
		if !ok {
			return errors.New("a list where one value is expected")
		}
		l.reset()
		for _, e := range x {
			str, ok := e.(string)
			if !ok {
				return fmt.Errorf("list entry %s is not a string", fileValue(e))
			}
			if err := l.Set(str); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("a %T is not a value of this setting", v)
}

// fileValue writes a value of the config file as TOML does.
func fileValue(v any) string {
	switch x := v.(type) {
	case string:
		return tomlString(x)
	case []any:
		items := make([]string, len(x))
		for i, e := range x {
			items[i] = fileValue(e)
		}
		return "[" + strings.Join(items, ", ") + "]"
	}
	return fmt.Sprint(v)
}

// plainError says what the flag package's "parse error" means.
func plainError(err error) error {
	if err.Error() == "parse error" {
		return errors.New("not a number, duration or boolean as the setting needs")
	}
	return err
}

// sourceDefault is where a setting no source set comes from.
const sourceDefault = "default"

// origin says where the value of a setting came from, for a message that
// names the setting by its flag: nothing when the flag set it.
func (c *Config) origin(name string) string {
	switch src := c.from[name]; src {
	case "":
		return ""
	case sourceDefault:
		return " (default)"
	default:
		return " (from " + src + ")"
	}
}

// Validate fails fast, naming the setting at fault and where its value
// came from.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if !messages.ValidHost(c.Host) {
		bad("--host %q%s: must be 1-64 characters of A-Z a-z 0-9 _ - (it is a NATS subject token)", c.Host, c.origin("host"))
	}
	if c.NATSURL == "" && c.NATSDataDir == "" {
		bad("--nats-data-dir%s: needed for the embedded server when --nats-url%s is empty", c.origin("nats-data-dir"), c.origin("nats-url"))
	}
	// NATSAuth's messages name its flags; those set elsewhere are named
	// with their sources first.
	var natsGiven, natsFrom []string
	for _, name := range c.NATS.given() {
		if flagName, ok := strings.CutPrefix(name, "--"); ok && c.origin(flagName) != "" {
			name += c.origin(flagName)
			natsFrom = append(natsFrom, name)
		}
		natsGiven = append(natsGiven, name)
	}
	if c.NATSURL == "" && len(natsGiven) > 0 {
		bad("%s: only for a NATS server given with --nats-url; without one, the worker starts its embedded server, "+
			"which has no TLS and makes its own credentials, in %s (docs/security.md 1.1)", strings.Join(natsGiven, ", "), embedded.CredentialsPath(c.NATSDataDir))
	} else if err := c.NATS.Validate(c.NATSURL); err != nil {
		if len(natsFrom) > 0 {
			err = fmt.Errorf("%s: %w", strings.Join(natsFrom, ", "), err)
		}
		errs = append(errs, err)
	}
	if c.InboxPrefix != "" {
		if err := checkInboxPrefix(c.InboxPrefix); err != nil {
			bad("--inbox-prefix %q%s: %v", c.InboxPrefix, c.origin("inbox-prefix"), err)
		}
	}
	if err := checkInboxPrefix(c.OperatorInboxPrefix); err != nil {
		bad("--operator-inbox-prefix %q%s: %v", c.OperatorInboxPrefix, c.origin("operator-inbox-prefix"), err)
	} else if !strings.HasPrefix(c.OperatorInboxPrefix, nats.InboxPrefix) {
		// The worker publishes its replies under it, with permissions
		// its senders may lack (docs/protocol.md 2.9).
		bad("--operator-inbox-prefix %q%s: must be under %s, where the worker may answer control requests", c.OperatorInboxPrefix, c.origin("operator-inbox-prefix"), nats.InboxPrefix)
	}
	if c.NATSPort < 1 || c.NATSPort > 65535 {
		bad("--nats-port %d%s: not a TCP port", c.NATSPort, c.origin("nats-port"))
	}
	if u, err := url.Parse(c.LibvirtURI); err != nil || u.Scheme == "" {
		bad("--libvirt-uri %q%s: not a libvirt URI such as qemu:///system", c.LibvirtURI, c.origin("libvirt-uri"))
	}
	switch c.DomainType {
	case "", "kvm", "qemu":
	default:
		bad(`--domain-type %q%s: must be "kvm", "qemu" or empty`, c.DomainType, c.origin("domain-type"))
	}
	if c.Parallelism < 1 {
		bad("--parallelism %d%s: must be at least 1", c.Parallelism, c.origin("parallelism"))
	}
	if warm := c.Warm.total(); warm >= c.MaxVMs {
		bad("--warm %s%s: %d warm machines leave no room under --max-vms %d%s for a cold build",
			c.Warm.String(), c.origin("warm"), warm, c.MaxVMs, c.origin("max-vms"))
	}
	if c.WarmMaxAge < 0 {
		bad("--warm-max-age %s%s: must not be negative", c.WarmMaxAge, c.origin("warm-max-age"))
	}
	if c.MaxVMs < 1 {
		bad("--max-vms %d%s: must be at least 1", c.MaxVMs, c.origin("max-vms"))
	}
	if c.AckWait < 3*time.Second {
		bad("--ack-wait %s%s: must be at least 3s", c.AckWait, c.origin("ack-wait"))
	}
	if c.MaxDeliver < 1 {
		bad("--max-deliver %d%s: must be at least 1", c.MaxDeliver, c.origin("max-deliver"))
	}
	if c.EventsMaxAge < time.Minute {
		bad("--events-max-age %s%s: must be at least 1m", c.EventsMaxAge, c.origin("events-max-age"))
	}
	if c.RequestsMaxAge < time.Minute {
		bad("--requests-max-age %s%s: must be at least 1m", c.RequestsMaxAge, c.origin("requests-max-age"))
	}
	if c.Replicas < 1 || c.Replicas > 5 {
		bad("--replicas %d%s: must be between 1 and 5", c.Replicas, c.origin("replicas"))
	}
	if c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			bad("--http-addr %q%s: not host:port, such as 127.0.0.1:9464", c.HTTPAddr, c.origin("http-addr"))
		}
	}
	switch c.LogFormat {
	case "text", "json":
	default:
		bad(`--log-format %q%s: must be "text" or "json"`, c.LogFormat, c.origin("log-format"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad(`--log-level %q%s: must be debug, info, warn or error`, c.LogLevel, c.origin("log-level"))
	}
	for _, b := range []struct {
		flag     string
		v, total int
		totalOf  string
	}{
		{"max-vcpus-per-machine", c.MaxVCPUsPerMachine, c.HostVCPUs, "host-vcpus"},
		{"max-memory-per-machine", c.MaxMemoryPerMachine, c.HostMemory, "host-memory"},
	} {
		if b.v < 0 {
			bad("--%s %d%s: must be 0 (no bound) or more", b.flag, b.v, c.origin(b.flag))
		}
		if b.total < 0 {
			bad("--%s %d%s: must be 0 (no bound) or more", b.totalOf, b.total, c.origin(b.totalOf))
		}
		if b.v > 0 && b.total > 0 && b.v > b.total {
			bad("--%s %d%s: more than --%s %d%s, which no machine can exceed", b.flag, b.v, c.origin(b.flag), b.totalOf, b.total, c.origin(b.totalOf))
		}
	}
	if c.MaxScratchGiB < 0 || c.MaxScratchGiB > messages.MaxScratchDiskGiB {
		bad("--max-scratch-gib %d%s: must be between 0 (no bound) and %d", c.MaxScratchGiB, c.origin("max-scratch-gib"), messages.MaxScratchDiskGiB)
	}
	if c.ConsoleDir != "" && !filepath.IsAbs(c.ConsoleDir) {
		bad("--console-dir %q%s: must be an absolute path, or empty to capture no consoles", c.ConsoleDir, c.origin("console-dir"))
	}
	if c.MaxHold < 0 || c.MaxHold > maxMaxHold {
		bad("--max-hold %s%s: must be between 0 (no holds) and %s", c.MaxHold, c.origin("max-hold"), maxMaxHold)
	}
	if err := c.Isolation.validate(c.origin); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// workerInbox is the prefix of the worker's inboxes.
func (c *Config) workerInbox() string {
	if c.InboxPrefix != "" {
		return c.InboxPrefix
	}
	return bus.WorkerInbox(c.Host)
}

// consoleCapture returns the directory the worker's machines log their
// consoles to, "" for none: ConsoleDir, unless libvirt is remote, whose
// files the worker could not read (docs/protocol.md 7.7).
func (c *Config) consoleCapture() string {
	u, err := url.Parse(c.LibvirtURI)
	if err != nil {
		return ""
	}
	driver, transport, _ := strings.Cut(u.Scheme, "+")
	local := driver == "test" || transport == "unix" || (transport == "" && u.Host == "")
	if !local {
		return ""
	}
	return c.ConsoleDir
}
