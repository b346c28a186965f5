package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
)

// GoBench is what go test -bench reported, by benchmark name (without
// the -GOMAXPROCS suffix) and unit, one value per -count.
type GoBench map[string]map[string][]float64

// Summary describes one metric of one benchmark.
func (g GoBench) Summary(name, unit string) Summary { return Summarize(g[name][unit]) }

// EventsConfig configures the event stream benchmarks.
type EventsConfig struct {
	// Root is the repository; Profiles the directory for the replay's
	// profiles.
	Root, Profiles string
	// Count is go test's -count.
	Count int
	Log   func(format string, args ...any)
}

// RunEvents runs internal/bus's BenchmarkReplay (with its profiles) and
// BenchmarkAppend.
func RunEvents(ctx context.Context, cfg EventsConfig) (GoBench, error) {
	out := GoBench{}
	for _, b := range []struct{ name, benchtime string }{
		{"BenchmarkReplay", "2x"},
		{"BenchmarkAppend", "2000x"},
	} {
		cfg.Log("events: %s, -count %d", b.name, cfg.Count)
		args := []string{"test", "-run", "^$", "-bench", "^" + b.name + "$", "-benchtime", b.benchtime,
			"-count", strconv.Itoa(cfg.Count), "./internal/bus/"}
		if b.name == "BenchmarkReplay" {
			args = append(args, "-args", "-replay-profile", cfg.Profiles)
		}
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = cfg.Root
		var stdout bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, tail(stdout.String(), 2000))
		}
		if err := parseGoBench(stdout.String(), out); err != nil {
			return nil, err
		}
	}
	return out, nil
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+\d+\s+(.*)$`)

// parseGoBench adds the result lines of go test -bench output to into.
func parseGoBench(s string, into GoBench) error {
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		f := strings.Fields(m[3])
		if len(f)%2 != 0 {
			return fmt.Errorf("benchmark line %q", sc.Text())
		}
		if into[m[1]] == nil {
			into[m[1]] = map[string][]float64{}
		}
		for i := 0; i < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				return fmt.Errorf("benchmark line %q: %w", sc.Text(), err)
			}
			into[m[1]][f[i+1]] = append(into[m[1]][f[i+1]], v)
		}
	}
	return sc.Err()
}

// pprofTop returns go tool pprof's -top table for the profile with the
// given options, without its header lines.
func pprofTop(ctx context.Context, profile string, opts ...string) (string, error) {
	args := append([]string{"tool", "pprof", "-top"}, opts...)
	args = append(args, profile)
	out, err := exec.CommandContext(ctx, "go", args...).Output()
	if err != nil {
		return "", fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	for i, l := range lines {
		if strings.Contains(l, "flat%") {
			return strings.Join(lines[i:], "\n"), nil
		}
	}
	return string(out), nil
}
