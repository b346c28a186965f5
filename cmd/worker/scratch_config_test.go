package main

import (
	"strings"
	"testing"
)

// TestMaxScratchGiB: --max-scratch-gib bounds a machine's scratch disk,
// 100 GiB unless set, from a flag, the environment or the config file; 0
// is no bound, and a bound the protocol's limit could not reach or below
// 0 stops the worker.
func TestMaxScratchGiB(t *testing.T) {
	tests := []struct {
		name string
		env  map[string]string
		file string
		args []string
		want int
		err  string
	}{
		{name: "default", want: 100},
		{name: "flag", args: []string{"--max-scratch-gib", "500"}, want: 500},
		{name: "environment", env: map[string]string{"STRETCHY_MAX_SCRATCH_GIB": "20"}, want: 20},
		{name: "file", file: "max-scratch-gib = 0", want: 0},
		{name: "negative", args: []string{"--max-scratch-gib", "-1"}, err: "--max-scratch-gib -1: must be between 0 (no bound) and 65536"},
		{name: "beyond the protocol's limit", file: "max-scratch-gib = 65537", err: "key max-scratch-gib): must be between 0 (no bound) and 65536"},
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
			c, _, err := loadConfig("worker run", args)
			switch {
			case tt.err != "":
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("loadConfig = %v, want %q", err, tt.err)
				}
			case err != nil:
				t.Fatal(err)
			case c.MaxScratchGiB != tt.want:
				t.Fatalf("MaxScratchGiB = %d, want %d", c.MaxScratchGiB, tt.want)
			}
		})
	}
}
