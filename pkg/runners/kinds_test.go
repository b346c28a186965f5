package runners

import (
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// TestKinds: the table holds every runner kind once, none first, and
// Lookup finds each.
func TestKinds(t *testing.T) {
	want := []messages.RunnerKind{messages.RunnerNone, messages.RunnerForgejo, messages.RunnerGitHub, messages.RunnerJenkins}
	got := Kinds()
	if len(got) != len(want) {
		t.Fatalf("%d kinds, want %d", len(got), len(want))
	}
	for i, k := range got {
		if k.Kind != want[i] {
			t.Errorf("kind %d is %q, want %q", i, k.Kind, want[i])
		}
		if l, ok := Lookup(k.Kind); !ok || l.Kind != k.Kind {
			t.Errorf("Lookup(%q) = %q, %v", k.Kind, l.Kind, ok)
		}
		if k.Starts() != (k.Kind != messages.RunnerNone) || (k.Name == "") == k.Starts() {
			t.Errorf("%q: Starts %v, Name %q", k.Kind, k.Starts(), k.Name)
		}
	}
	if _, ok := Lookup("gitlab"); ok {
		t.Error("Lookup finds an unknown kind")
	}
}

// TestKindProgram: Program and Home say what the plans start, for every
// kind and OS family.
func TestKindProgram(t *testing.T) {
	for _, rc := range runnerCases {
		k, _ := Lookup(rc.runner().Kind)
		for _, goos := range allOS {
			t.Run(rc.name+"/"+string(goos), func(t *testing.T) {
				program, err := k.Program(goos)
				plan, perr := For(testJob, goos, rc.runner(), testLifetime)
				switch {
				case errors.Is(perr, ErrUnsupported):
					if !errors.Is(err, ErrUnsupported) {
						t.Errorf("Program = %q, %v; the plan is unsupported: %v", program, err, perr)
					}
				case perr != nil || err != nil:
					t.Fatalf("Program: %v; For: %v", err, perr)
				case program != plan.Program:
					t.Errorf("Program = %q, the plan starts %q", program, plan.Program)
				}
				if perr == nil && Home(goos) != plan.Home {
					t.Errorf("Home = %q, the plan's is %q", Home(goos), plan.Home)
				}
			})
		}
	}
	none, _ := Lookup(messages.RunnerNone)
	if _, err := none.Program(Linux); !errors.Is(err, ErrInvalid) {
		t.Errorf("none.Program = %v, want ErrInvalid", err)
	}
	forgejo, _ := Lookup(messages.RunnerForgejo)
	if _, err := forgejo.Program("plan9"); !errors.Is(err, ErrUnknownOS) {
		t.Errorf("Program on plan9 = %v, want ErrUnknownOS", err)
	}
	if h := Home("plan9"); h != "" {
		t.Errorf("Home(plan9) = %q", h)
	}
}

// TestKindConflicts: forgejo-runner reads .runner in its working
// directory, the home directory the launch script changes to, so that
// file conflicts with every Forgejo job; the other runners have none.
func TestKindConflicts(t *testing.T) {
	for _, k := range Kinds() {
		for _, goos := range allOS {
			t.Run(string(k.Kind)+"/"+string(goos), func(t *testing.T) {
				var want []string
				if k.Kind == messages.RunnerForgejo {
					want = []string{layoutFor(goos, "").join(Home(goos), ".runner")}
				}
				var got []string
				for _, c := range k.Conflicts(goos) {
					got = append(got, c.Path)
					if c.Why == "" {
						t.Errorf("%s: no reason given", c.Path)
					}
				}
				if !slices.Equal(got, want) {
					t.Errorf("Conflicts = %q, want %q", got, want)
				}
			})
		}
	}
	forgejo, _ := Lookup(messages.RunnerForgejo)
	if c := forgejo.Conflicts("plan9"); c != nil {
		t.Errorf("Conflicts on plan9 = %+v", c)
	}
	// The launch script runs the runner in the home directory, where the
	// relative runner.file is read.
	for _, goos := range allOS {
		p, err := For(testJob, goos, forgejoRunner(), testLifetime)
		if err != nil {
			t.Fatal(err)
		}
		cd := map[bool]string{true: "Set-Location -LiteralPath " + psQuote(p.Home), false: "HOME=" + shellQuote(p.Home)}[goos == Windows]
		if !strings.Contains(launchScript(p), cd) {
			t.Errorf("%s: the launch script does not work in %s", goos, p.Home)
		}
	}
}
