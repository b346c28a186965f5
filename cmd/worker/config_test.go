package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// clearEnv unsets every STRETCHY_ variable for the test.
func clearEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "STRETCHY_") {
			t.Setenv(name, "")
			os.Unsetenv(name)
		}
	}
}

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "worker.toml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestConfigPrecedence: a flag wins over the environment, the environment
// over the file, the file over the default, for each kind of setting.
func TestConfigPrecedence(t *testing.T) {
	file := `
parallelism = 5
max-vms = 11
ack-wait = "45s"
images = ["win-*", "macos:14"]
min-free-space = "20GiB"
host = "from-file"
nats-url = "nats://a:4222,nats://b:4222"
max-vcpus-per-machine = 8
max-memory-per-machine = 16384
host-vcpus = 32
host-memory = 65536
console-dir = "/srv/consoles"
max-hold = "30m"
`
	tests := []struct {
		name  string
		env   map[string]string
		args  []string
		check func(t *testing.T, c Config)
	}{
		{"defaults", nil, nil, func(t *testing.T, c Config) {
			if c.Parallelism != 3 || c.MaxVMs != 8 || c.AckWait != 30*time.Second || len(c.Images) != 0 || c.MinFreeSpace != 2<<30 {
				t.Errorf("defaults: %+v", c)
			}
			if c.MaxVCPUsPerMachine != 0 || c.MaxMemoryPerMachine != 0 || c.HostVCPUs != 0 || c.HostMemory != 0 ||
				c.ConsoleDir != "/var/log/stretchy-worker/console" || c.MaxHold != time.Hour {
				t.Errorf("size, console and hold defaults: %+v", c)
			}
		}},
		{"file", map[string]string{"STRETCHY_CONFIG": "@"}, nil, func(t *testing.T, c Config) {
			if c.Parallelism != 5 || c.MaxVMs != 11 || c.AckWait != 45*time.Second || c.Images.String() != "win-*,macos:14" ||
				c.MinFreeSpace != 20<<30 || c.Host != "from-file" || c.NATSURL != "nats://a:4222,nats://b:4222" {
				t.Errorf("from the file: %+v", c)
			}
			if c.MaxVCPUsPerMachine != 8 || c.MaxMemoryPerMachine != 16384 || c.HostVCPUs != 32 || c.HostMemory != 65536 ||
				c.ConsoleDir != "/srv/consoles" || c.MaxHold != 30*time.Minute {
				t.Errorf("size, console and hold from the file: %+v", c)
			}
		}},
		{"size, console and hold: environment over file, flag over environment",
			map[string]string{"STRETCHY_CONFIG": "@", "STRETCHY_HOST_VCPUS": "16", "STRETCHY_CONSOLE_DIR": "", "STRETCHY_MAX_HOLD": "0s",
				"STRETCHY_MAX_MEMORY_PER_MACHINE": "4096"},
			[]string{"--max-memory-per-machine", "2048", "--host-memory", "8192"}, func(t *testing.T, c Config) {
				if c.HostVCPUs != 16 || c.ConsoleDir != "" || c.MaxHold != 0 || c.MaxMemoryPerMachine != 2048 || c.HostMemory != 8192 ||
					c.MaxVCPUsPerMachine != 8 {
					t.Errorf("size, console and hold: %+v", c)
				}
			}},
		{"environment over file", map[string]string{"STRETCHY_CONFIG": "@", "STRETCHY_PARALLELISM": "7", "STRETCHY_IMAGES": "gpu-*"}, nil,
			func(t *testing.T, c Config) {
				if c.Parallelism != 7 || c.Images.String() != "gpu-*" || c.MaxVMs != 11 {
					t.Errorf("env over file: %+v", c)
				}
			}},
		{"flag over environment", map[string]string{"STRETCHY_PARALLELISM": "7", "STRETCHY_MAX_VMS": "9"},
			[]string{"--config", "@", "--parallelism", "2", "--images", "a,b", "--images", "c"}, func(t *testing.T, c Config) {
				if c.Parallelism != 2 || c.MaxVMs != 9 || c.Images.String() != "a,b,c" || c.AckWait != 45*time.Second {
					t.Errorf("flag over env: %+v", c)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			path := writeConfig(t, file)
			for k, v := range tt.env {
				t.Setenv(k, strings.ReplaceAll(v, "@", path))
			}
			var args []string
			for _, a := range tt.args {
				args = append(args, strings.ReplaceAll(a, "@", path))
			}
			c, _, err := loadConfig("worker run", args)
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, c)
		})
	}
}

// TestConfigBadValue: an invalid value stops the worker, whatever its
// source, with a message naming the setting and where it came from.
func TestConfigBadValue(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		file string
		args []string
		want []string
	}{
		{"flag", nil, "", []string{"--parallelism", "abc"}, []string{`invalid value "abc" for flag -parallelism`}},
		{"environment", map[string]string{"STRETCHY_PARALLELISM": "abc"}, "", nil,
			[]string{`STRETCHY_PARALLELISM="abc": invalid value for --parallelism`}},
		{"environment duration", map[string]string{"STRETCHY_ACK_WAIT": "soon"}, "", nil,
			[]string{`STRETCHY_ACK_WAIT="soon": invalid value for --ack-wait`}},
		{"file", nil, `parallelism = "abc"`, nil, []string{`parallelism = "abc": invalid value`}},
		{"file type", nil, `max-vms = 1.5`, nil, []string{`max-vms = 1.5: invalid value`}},
		{"file list for one value", nil, `parallelism = [3]`, nil, []string{`parallelism = [3]: invalid value: a list where one value is expected`}},
		{"file list entry", nil, `warm = ["debian-12"]`, nil, []string{`warm = ["debian-12"]: invalid value: "debian-12" is not image=N`}},
		{"file list entry type", nil, `images = ["debian-*", 12]`, nil, []string{`images = ["debian-*", 12]: invalid value: list entry 12 is not a string`}},
		{"file unknown key", nil, `paralelism = 4`, nil, []string{`unknown setting "paralelism"`}},
		{"file syntax", nil, `parallelism = `, nil, []string{"config file"}},
		{"file size", nil, `min-free-space = "lots"`, nil, []string{`min-free-space = "lots": invalid value`}},
		{"file range", nil, `parallelism = 0`, nil, []string{"--parallelism 0 (from config file ", "key parallelism): must be at least 1"}},
		{"environment pattern", map[string]string{"STRETCHY_IMAGES": "win-["}, "", nil, []string{`STRETCHY_IMAGES="win-[": invalid value for --images: pattern "win-["`}},
		{"missing file", map[string]string{"STRETCHY_CONFIG": "/nonexistent/worker.toml"}, "", nil, []string{"config file /nonexistent/worker.toml"}},
		{"http address", nil, `http-addr = "9464"`, nil, []string{`--http-addr "9464"`}},
		{"negative vCPUs", nil, "", []string{"--max-vcpus-per-machine", "-1"}, []string{"--max-vcpus-per-machine -1: must be 0 (no bound) or more"}},
		{"negative host memory", map[string]string{"STRETCHY_HOST_MEMORY": "-5"}, "", nil, []string{"--host-memory -5 (from STRETCHY_HOST_MEMORY): must be 0 (no bound) or more"}},
		{"memory per machine above the host's", nil, "max-memory-per-machine = 8192\nhost-memory = 4096", nil,
			[]string{"--max-memory-per-machine 8192 (from config file ", "key max-memory-per-machine): more than --host-memory 4096 (from config file ", "key host-memory)"}},
		{"vCPUs per machine above the host's", nil, "", []string{"--max-vcpus-per-machine", "4", "--host-vcpus", "2"},
			[]string{"--max-vcpus-per-machine 4: more than --host-vcpus 2"}},
		{"memory not a number", nil, `host-memory = "16GiB"`, nil, []string{`host-memory = "16GiB": invalid value`}},
		{"relative console directory", nil, `console-dir = "console"`, nil, []string{`--console-dir "console" (from config file `, `key console-dir): must be an absolute path`}},
		{"hold too long", nil, "", []string{"--max-hold", "200h"}, []string{"--max-hold 200h0m0s: must be between 0 (no holds) and 168h0m0s"}},
		{"negative hold", map[string]string{"STRETCHY_MAX_HOLD": "-1m"}, "", nil, []string{"--max-hold -1m0s (from STRETCHY_MAX_HOLD)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			args := tt.args
			if tt.file != "" {
				args = append([]string{"--config", writeConfig(t, tt.file)}, args...)
			}
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			_, _, err := loadConfig("worker run", args)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestConfigInvalidSource: a value that parses but is out of bounds
// stops the worker with a message naming where it was set: the flag, the
// environment variable, or the config file and its key (@ is the file).
func TestConfigInvalidSource(t *testing.T) {
	tests := []struct {
		name      string
		env       map[string]string
		file      string
		args      []string
		want, not []string
	}{
		{"flag", nil, "", []string{"--ack-wait", "1s"}, []string{"--ack-wait 1s: must be at least 3s"}, []string{"(from", "(default)"}},
		{"environment", map[string]string{"STRETCHY_ACK_WAIT": "1s"}, "", nil,
			[]string{"--ack-wait 1s (from STRETCHY_ACK_WAIT): must be at least 3s"}, nil},
		{"file", nil, `ack-wait = "1s"`, nil,
			[]string{"--ack-wait 1s (from config file @, key ack-wait): must be at least 3s"}, nil},
		{"file, its path from the environment", map[string]string{"STRETCHY_CONFIG": "@"}, `replicas = 7`, nil,
			[]string{"--replicas 7 (from config file @, key replicas): must be between 1 and 5"}, nil},
		{"flag over file", nil, `ack-wait = "1s"`, []string{"--ack-wait", "2s"}, []string{"--ack-wait 2s: must be at least 3s"}, []string{"(from"}},
		{"two settings, two sources", map[string]string{"STRETCHY_MAX_VMS": "4"}, `warm = ["debian-12=4"]`, nil,
			[]string{"--warm debian-12=4 (from config file @, key warm): 4 warm machines leave no room under --max-vms 4 (from STRETCHY_MAX_VMS)"}, nil},
		{"a default in the message", nil, `warm = ["debian-12=8"]`, nil,
			[]string{"--warm debian-12=8 (from config file @, key warm): 8 warm machines leave no room under --max-vms 8 (default)"}, nil},
		{"string", map[string]string{"STRETCHY_LOG_LEVEL": "loud"}, "", nil,
			[]string{`--log-level "loud" (from STRETCHY_LOG_LEVEL): must be debug, info, warn or error`}, nil},
		{"bounds of machines", nil, "max-vcpus-per-machine = 8", []string{"--host-vcpus", "4"},
			[]string{"--max-vcpus-per-machine 8 (from config file @, key max-vcpus-per-machine): more than --host-vcpus 4, which"}, nil},
		{"credentials without a server", nil, `nats-creds = "/etc/stretchy/worker.creds"`, nil,
			[]string{"--nats-creds (from config file @, key nats-creds): only for a NATS server given with --nats-url"}, nil},
		{"credentials file", map[string]string{"STRETCHY_NATS_URL": "nats://nats1:4222"}, `nats-creds = "/nonexistent/worker.creds"`, nil,
			[]string{"--nats-creds (from config file @, key nats-creds): --nats-creds: open /nonexistent/worker.creds"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			args := tt.args
			path := ""
			if tt.file != "" {
				path = writeConfig(t, tt.file)
				if tt.env["STRETCHY_CONFIG"] == "" {
					args = append([]string{"--config", path}, args...)
				}
			}
			for k, v := range tt.env {
				t.Setenv(k, strings.ReplaceAll(v, "@", path))
			}
			_, _, err := loadConfig("worker run", args)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if w = strings.ReplaceAll(w, "@", path); !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			for _, n := range tt.not {
				if strings.Contains(err.Error(), n) {
					t.Errorf("error %q says %q", err, n)
				}
			}
		})
	}
}

// TestConfigLists: every setting of several values takes a TOML array
// in the config file, or one string of comma-separated values, as the
// flag does.
func TestConfigLists(t *testing.T) {
	tests := []struct {
		name, file string
		env        map[string]string
		images     string
		warm       string
	}{
		{"arrays", `images = ["debian-*", "win11-*"]` + "\n" + `warm = ["debian-12=2", "win11-24h2=1"]`, nil, "debian-*,win11-*", "debian-12=2,win11-24h2=1"},
		{"strings", `images = "debian-*,win11-*"` + "\n" + `warm = "debian-12=2,win11-24h2=1"`, nil, "debian-*,win11-*", "debian-12=2,win11-24h2=1"},
		{"one-entry arrays", `images = ["debian-*"]` + "\n" + `warm = ["debian-12=2"]`, nil, "debian-*", "debian-12=2"},
		{"empty arrays", "images = []\nwarm = []", nil, "", ""},
		{"entries with commas", `warm = ["debian-12=2,ubuntu-24.04=1"]`, nil, "", "debian-12=2,ubuntu-24.04=1"},
		{"the environment replaces the file's", `images = ["debian-*"]` + "\n" + `warm = ["debian-12=2"]`,
			map[string]string{"STRETCHY_IMAGES": "win11-*", "STRETCHY_WARM": "win11-24h2=1"}, "win11-*", "win11-24h2=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			c, _, err := loadConfig("worker run", []string{"--config", writeConfig(t, tt.file)})
			if err != nil {
				t.Fatal(err)
			}
			if c.Images.String() != tt.images || c.Warm.String() != tt.warm {
				t.Errorf("images %q, warm %q; want %q, %q", c.Images.String(), c.Warm.String(), tt.images, tt.warm)
			}
		})
	}
}

// TestConsoleCapture: consoles are captured only where the worker can read
// the files, on the libvirt host.
func TestConsoleCapture(t *testing.T) {
	tests := []struct {
		uri, dir, want string
	}{
		{"qemu:///system", "/var/log/c", "/var/log/c"},
		{"qemu+unix:///system?socket=/run/x.sock", "/var/log/c", "/var/log/c"},
		{"test:///default", "/var/log/c", "/var/log/c"},
		{"qemu:///system", "", ""},
		{"qemu+ssh://root@build-07/system", "/var/log/c", ""},
		{"qemu+tls://build-07/system", "/var/log/c", ""},
		{"qemu://build-07/system", "/var/log/c", ""},
	}
	for _, tt := range tests {
		c := Config{LibvirtURI: tt.uri, ConsoleDir: tt.dir}
		if got := c.consoleCapture(); got != tt.want {
			t.Errorf("consoleCapture(%s, %q) = %q, want %q", tt.uri, tt.dir, got, tt.want)
		}
	}
}

// TestConfigPrint: worker config prints a file that loads to the same
// configuration, with credentials in the URL masked.
func TestConfigPrint(t *testing.T) {
	clearEnv(t)
	t.Setenv("STRETCHY_NATS_URL", "nats://user:hunter2@nats1:4222")
	c, fs, err := loadConfig("worker run", []string{"--images", "win-*", "--warm", "win-11=2,debian-12=1", "--min-free-space", "5GiB", "--parallelism", "4",
		"--host-memory", "65536", "--console-dir", "/srv/c", "--max-hold", "15m"})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	if err := printConfig(&b, fs); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, secret := range []string{"hunter2", "user:"} {
		if strings.Contains(out, secret) {
			t.Fatalf("the printed configuration shows a secret:\n%s", out)
		}
	}
	for _, want := range []string{`nats-url = "nats://REDACTED@nats1:4222"`, `images = ["win-*"]`, `warm = ["debian-12=1", "win-11=2"]`, `min-free-space = "5GiB"`, "parallelism = 4", `ack-wait = "30s"`,
		"host-memory = 65536", "max-vcpus-per-machine = 0", `console-dir = "/srv/c"`, `max-hold = "15m0s"`} {
		if !strings.Contains(out, want) {
			t.Errorf("missing %q in:\n%s", want, out)
		}
	}
	// Loaded back (with the real URL), it is the same configuration.
	clearEnv(t)
	path := writeConfig(t, strings.Replace(out, "REDACTED", "user:hunter2", 1))
	back, _, err := loadConfig("worker run", []string{"--config", path})
	if err != nil {
		t.Fatal(err)
	}
	back.ConfigFile, back.NATS.Password = "", c.NATS.Password
	if back.Images.String() != c.Images.String() || back.Warm.String() != c.Warm.String() || back.MinFreeSpace != c.MinFreeSpace || back.Parallelism != c.Parallelism ||
		back.NATSURL != c.NATSURL || back.AckWait != c.AckWait || back.Host != c.Host ||
		back.HostMemory != c.HostMemory || back.ConsoleDir != c.ConsoleDir || back.MaxHold != c.MaxHold {
		t.Fatalf("round trip:\n got %+v\nwant %+v", back, c)
	}
}

// TestInboxPrefixSettings: worker run's inbox prefix defaults to its
// host's worker inbox, and neither it nor the operators' prefix may be
// anything but literal tokens; the operators' must be under _INBOX.
func TestInboxPrefixSettings(t *testing.T) {
	tests := []struct {
		name  string
		env   map[string]string
		args  []string
		inbox string // the worker's, when valid
		says  string // "": valid
	}{
		{"default", nil, []string{"--host", "h1"}, "_INBOX.stretchy.LIBVIRT.worker.h1", ""},
		{"given", nil, []string{"--host", "h1", "--inbox-prefix", "_INBOX.w.h1"}, "_INBOX.w.h1", ""},
		{"from the environment", map[string]string{"STRETCHY_INBOX_PREFIX": "_R.h1"}, nil, "_R.h1", ""},
		{"operators' own", nil, []string{"--operator-inbox-prefix", "_INBOX.ops"}, "", ""},
		{"a wildcard", nil, []string{"--inbox-prefix", "_INBOX.a.*"}, "", `--inbox-prefix "_INBOX.a.*": a wildcard`},
		{"a trailing dot", nil, []string{"--inbox-prefix", "_INBOX.a."}, "", `--inbox-prefix "_INBOX.a.": a trailing dot`},
		{"an empty token", nil, []string{"--inbox-prefix", "_INBOX..a"}, "", `--inbox-prefix "_INBOX..a": an empty token`},
		{"white space", nil, []string{"--inbox-prefix", "_INBOX.a b"}, "", `--inbox-prefix "_INBOX.a b": white space`},
		{"a wildcard from the environment", map[string]string{"STRETCHY_INBOX_PREFIX": "_INBOX.>"}, nil, "",
			`--inbox-prefix "_INBOX.>" (from STRETCHY_INBOX_PREFIX): a wildcard`},
		{"operators' not under _INBOX.", nil, []string{"--operator-inbox-prefix", "ops.replies"}, "",
			`--operator-inbox-prefix "ops.replies": must be under _INBOX.`},
		{"operators' with a wildcard", map[string]string{"STRETCHY_OPERATOR_INBOX_PREFIX": "_INBOX.ops.>"}, nil, "",
			`--operator-inbox-prefix "_INBOX.ops.>" (from STRETCHY_OPERATOR_INBOX_PREFIX): a wildcard`},
		{"operators' empty", nil, []string{"--operator-inbox-prefix", ""}, "", `--operator-inbox-prefix "": empty`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			cfg, _, err := loadConfig("worker run", tt.args)
			if tt.says == "" {
				if err != nil {
					t.Fatal(err)
				}
				if tt.inbox != "" && cfg.workerInbox() != tt.inbox {
					t.Fatalf("the worker's inbox prefix %q, want %q", cfg.workerInbox(), tt.inbox)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("error %v, want one saying %q", err, tt.says)
			}
		})
	}
}
