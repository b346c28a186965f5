package runners

import (
	"bytes"
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// secretFields are the fields decided to be secrets (docs/protocol.md 7.3).
// A field added to a section must be added to the table, and if it is a
// secret, here too: TestSecretFields fails until both agree.
var secretFields = []string{"runner.forgejo.token", "runner.github.jit_config", "runner.jenkins.secret"}

// notInTable lists fields of section structs that the table deliberately
// leaves out, with the reason. Nothing is left out: every field is on the
// wire and must be checked, and decided secret or not.
var notInTable = map[string]string{}

// msgpackName is the wire name of a struct field.
func msgpackName(f reflect.StructField) string {
	name, _, _ := strings.Cut(f.Tag.Get("msgpack"), ",")
	return name
}

// TestTableCoversSections holds the table against messages.Runner by
// reflection: every section of messages.Runner is the section of one
// kind, and every field of every section is in that kind's table, read
// and written by its accessors, or deliberately not (notInTable). So a
// field added to a section, without deciding its rule and whether it is
// a secret, fails here.
func TestTableCoversSections(t *testing.T) {
	runnerType := reflect.TypeFor[messages.Runner]()
	sections := map[string]bool{}
	for i := range runnerType.NumField() {
		sf := runnerType.Field(i)
		if sf.Type.Kind() != reflect.Pointer || sf.Type.Elem().Kind() != reflect.Struct {
			continue // Kind
		}
		if sf.Type.Elem() == reflect.TypeFor[messages.SealedSecret]() {
			continue // any kind's secret, sealed (TestSealedRunner)
		}
		name := "runner." + msgpackName(sf)
		sections[name] = true
		t.Run(name, func(t *testing.T) {
			var kind Kind
			for _, k := range kinds {
				if k.Section == name {
					kind = k
				}
			}
			if kind.Section == "" {
				t.Fatalf("messages.Runner.%s (%s) is the section of no kind in the table", sf.Name, name)
			}
			// has sees this section and no other.
			var r messages.Runner
			reflect.ValueOf(&r).Elem().Field(i).Set(reflect.New(sf.Type.Elem()))
			for _, k := range kinds {
				if k.has != nil && k.has(r) != (k.Section == name) {
					t.Errorf("%s.has = %v for a runner holding only %s", k.Kind, k.has(r), name)
				}
			}

			st := sf.Type.Elem()
			inStruct := map[string]bool{}
			for j := range st.NumField() {
				ff := st.Field(j)
				wire := name + "." + msgpackName(ff)
				inStruct[wire] = true
				if why, ok := notInTable[wire]; ok {
					t.Logf("%s: not in the table: %s", wire, why)
					continue
				}
				at := slices.IndexFunc(kind.Fields, func(f Field) bool { return f.Wire == wire })
				if at < 0 {
					t.Errorf("%s.%s (%s) is not in the table of kind %s: add it, with its rule and whether it is a secret", st.Name(), ff.Name, wire, kind.Kind)
					continue
				}
				f := kind.Fields[at]
				// The accessors reach this very field: set it alone by
				// reflection and read it through the table, then the
				// other way round.
				var r messages.Runner
				sec := reflect.New(st)
				reflect.ValueOf(&r).Elem().Field(i).Set(sec)
				switch ff.Type {
				case reflect.TypeFor[string]():
					if f.List() {
						t.Errorf("%s is a string, the table has a list", wire)
						continue
					}
					sec.Elem().Field(j).SetString("set-by-reflection")
					if got := f.Value(r); got != "set-by-reflection" {
						t.Errorf("%s: Value = %q, the field holds %q", wire, got, "set-by-reflection")
					}
					f.Set(&r, "set-by-table")
					if got := sec.Elem().Field(j).String(); got != "set-by-table" {
						t.Errorf("%s: Set wrote %q into another field", wire, "set-by-table")
					}
				case reflect.TypeFor[[]string]():
					if !f.List() {
						t.Errorf("%s is a list, the table has a string", wire)
						continue
					}
					sec.Elem().Field(j).Set(reflect.ValueOf([]string{"set-by-reflection"}))
					if got := f.Values(r); !slices.Equal(got, []string{"set-by-reflection"}) {
						t.Errorf("%s: Values = %q", wire, got)
					}
					f.SetValues(&r, []string{"set-by-table"})
					if got := sec.Elem().Field(j).Interface().([]string); !slices.Equal(got, []string{"set-by-table"}) {
						t.Errorf("%s: SetValues wrote into another field", wire)
					}
				default:
					t.Errorf("%s is a %s: the table has rules for strings and lists of strings only", wire, ff.Type)
				}
			}
			for _, f := range kind.Fields {
				if !inStruct[f.Wire] {
					t.Errorf("the table has %s, which %s does not", f.Wire, st.Name())
				}
			}
			// A section's setters create it.
			for _, f := range kind.Fields {
				var r messages.Runner
				if f.List() {
					f.SetValues(&r, nil)
				} else {
					f.Set(&r, "")
				}
				if !kind.has(r) {
					t.Errorf("%s: setting it on an empty runner section does not create %s", f.Wire, name)
				}
			}
		})
	}
	for _, k := range kinds {
		if (k.Section == "") != (k.has == nil) || k.Section != "" && !sections[k.Section] {
			t.Errorf("kind %s: section %q is not one of messages.Runner", k.Kind, k.Section)
		}
	}
}

// TestFieldRules: every field has a rule that fits its type, secrets are
// exactly the fields with the secret rule, and each has what worker submit
// needs.
func TestFieldRules(t *testing.T) {
	wires := map[string]bool{}
	for _, k := range kinds {
		for _, f := range k.Fields {
			t.Run(f.Wire, func(t *testing.T) {
				if wires[f.Wire] {
					t.Error("in the table twice")
				}
				wires[f.Wire] = true
				if !strings.HasPrefix(f.Wire, k.Section+".") {
					t.Errorf("not in section %s", k.Section)
				}
				switch {
				case f.Rule < RuleText || f.Rule > RuleUUID:
					t.Errorf("rule %d is none of the rules", f.Rule)
				case f.List() != (f.Rule == RuleLabels):
					t.Errorf("list %v with rule %d", f.List(), f.Rule)
				case f.Secret != (f.Rule == RuleSecret):
					t.Errorf("Secret %v with rule %d: a secret follows RuleSecret, which never repeats it, and a field following it is a secret", f.Secret, f.Rule)
				}
				if f.each != nil && !f.List() {
					t.Error("each is for lists")
				}
				if f.Flag == "" || f.Usage == "" {
					t.Errorf("flag %q, usage %q: worker submit needs both", f.Flag, f.Usage)
				}
				if f.Secret != (f.Flag == "secret-file") {
					t.Errorf("flag %q: secrets, and only they, are read from --secret-file", f.Flag)
				}
			})
		}
	}
}

// TestSecretFields: the table marks secret exactly the fields decided to
// be secrets.
func TestSecretFields(t *testing.T) {
	var got []string
	for _, k := range kinds {
		for _, f := range k.Fields {
			if f.Secret {
				got = append(got, f.Wire)
			}
		}
	}
	if !slices.Equal(got, secretFields) {
		t.Errorf("secret fields in the table: %q\ndecided (secretFields): %q", got, secretFields)
	}
}

// filled is a valid runner section of kind k with a distinct value in
// every field; secret fields hold "PLANTED-<wire>".
func filled(k Kind) messages.Runner {
	r := messages.Runner{Kind: k.Kind}
	for _, f := range k.Fields {
		switch f.Rule {
		case RuleURL:
			f.Set(&r, "https://"+strings.NewReplacer(".", "-", "_", "-").Replace(f.Wire)+".example/")
		case RuleLabels:
			f.SetValues(&r, []string{f.Wire + "-label"})
		case RuleSecret:
			f.Set(&r, "PLANTED-"+f.Wire)
		case RuleUUID:
			f.Set(&r, "0e6f5f3c-3b7a-4c2e-9d7a-1c2b3a4d5e6f")
		default:
			f.Set(&r, f.Wire+"-value")
		}
	}
	return r
}

// TestSecrets: for every kind, Secrets returns the value of every field
// the table marks secret, and nothing else, and every one of them reaches
// the guest only as the standard input of a command marked SecretStdin.
func TestSecrets(t *testing.T) {
	for _, k := range kinds {
		if !k.Starts() {
			continue
		}
		r := filled(k)
		p := provisionOf(r)
		if err := Validate(&p); err != nil {
			t.Fatalf("%s: the filled section is invalid: %v", k.Kind, err)
		}
		var want []string
		for _, f := range k.Fields {
			if f.Secret {
				want = append(want, f.Value(r))
			}
		}
		t.Run(string(k.Kind), func(t *testing.T) {
			if got := Secrets(r); !slices.Equal(got, want) {
				t.Errorf("Secrets = %q, want %q", got, want)
			}
		})
		for _, goos := range allOS {
			t.Run(string(k.Kind)+"/"+string(goos), func(t *testing.T) {
				plan, err := For(testJob, goos, r, testLifetime)
				if errors.Is(err, ErrUnsupported) {
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				for _, secret := range want {
					carried := 0
					for _, c := range append(slices.Clone(plan.Prepare), plan.Launch) {
						text := strings.Join(append(append([]string{c.Path, c.Purpose}, c.Args...), c.Env...), "\x00")
						switch {
						case strings.Contains(text, secret):
							t.Errorf("%s: %s is in its path, purpose, arguments or environment", c.Purpose, secret)
						case c.SecretStdin && string(c.Stdin) == secret:
							carried++
						case bytes.Contains(c.Stdin, []byte(secret)):
							t.Errorf("%s: %s is in a standard input not marked secret, or with more", c.Purpose, secret)
						}
					}
					if carried != 1 {
						t.Errorf("%s is carried by %d commands, want 1", secret, carried)
					}
				}
			})
		}
	}
}

// TestSecretsOfRunner: Secrets reads every section that is set, of the
// kind or not, in the order of the table, as internal/lifecycle's
// secretsOf did.
func TestSecretsOfRunner(t *testing.T) {
	all := messages.Runner{Kind: messages.RunnerGitHub,
		Forgejo: &messages.ForgejoRunner{Token: "t", URL: "https://u/"},
		GitHub:  &messages.GitHubRunner{JITConfig: "j"},
		Jenkins: &messages.JenkinsAgent{Secret: "s", AgentName: "a"}}
	tests := []struct {
		name string
		r    messages.Runner
		want []string
	}{
		{"none", messages.Runner{Kind: messages.RunnerNone}, nil},
		{"every section", all, []string{"t", "j", "s"}},
		{"a section of another kind", messages.Runner{Kind: messages.RunnerNone, Jenkins: all.Jenkins}, []string{"s"}},
		{"an unknown kind", messages.Runner{Kind: "gitlab", Forgejo: all.Forgejo}, []string{"t"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Secrets(tt.r); !slices.Equal(got, tt.want) {
				t.Errorf("Secrets = %q, want %q", got, tt.want)
			}
		})
	}
}
