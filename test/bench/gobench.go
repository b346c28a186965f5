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

// RunEvents runs pkg/client's BenchmarkReplay cfg.Count times, each
// with servers and stored events of its own, so that its readers take
// turns, its BenchmarkReplayPaired once (the iterator against the
// callback loop, pair by pair), and internal/bus's BenchmarkAppend with
// -count; then, unless
// cfg.Profiles is empty, once more the replay through ReadEvents alone
// with its profiles, whose figures are not kept (profiling slows it
// down).
func RunEvents(ctx context.Context, cfg EventsConfig) (GoBench, error) {
	out := GoBench{}
	type run struct {
		pkg, pattern, benchtime string
		count                   int
		profile                 bool
	}
	var runs []run
	for range cfg.Count {
		runs = append(runs, run{"./pkg/client/", "^BenchmarkReplay$", "2x", 1, false})
	}
	runs = append(runs, run{"./pkg/client/", "^BenchmarkReplayPaired$", "10x", 1, false})
	runs = append(runs, run{"./internal/bus/", "^BenchmarkAppend$", "2000x", cfg.Count, false})
	if cfg.Profiles != "" {
		runs = append(runs, run{"./pkg/client/", "^BenchmarkReplay$/^server=process$/^read=ReadEvents$", "2x", 1, true})
	}
	for i, r := range runs {
		cfg.Log("events %d/%d: %s", i+1, len(runs), r.pattern)
		args := []string{"test", "-run", "^$", "-bench", r.pattern, "-benchtime", r.benchtime,
			"-count", strconv.Itoa(r.count), r.pkg}
		if r.profile {
			args = append(args, "-args", "-replay-profile", cfg.Profiles)
		}
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Dir = cfg.Root
		var stdout bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("go %s: %w: %s", strings.Join(args, " "), err, tail(stdout.String(), 2000))
		}
		if r.profile {
			continue
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
