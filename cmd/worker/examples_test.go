package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"strings"
	"testing"
)

// configExample is a config file, or a piece of one, the documentation
// shows.
type configExample struct {
	where string // file:line
	body  string
}

var inlineSetting = regexp.MustCompile("`([a-z][a-z0-9-]* = [^`]+)`")

// configExamples finds the config examples of a Markdown document: its
// toml code blocks and its inline code of the form key = value.
func configExamples(t *testing.T, path string) []configExample {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []configExample
	var block *configExample
	fence := ""
	for i, line := range strings.Split(string(b), "\n") {
		where := fmt.Sprintf("%s:%d", path, i+1)
		trimmed := strings.TrimSpace(line)
		switch {
		case fence != "" && strings.HasPrefix(trimmed, fence):
			if block != nil {
				out = append(out, *block)
			}
			block, fence = nil, ""
		case fence != "":
			if block != nil {
				block.body += line + "\n"
			}
		case strings.HasPrefix(trimmed, "```"):
			fence = "```"
			if strings.TrimPrefix(trimmed, "```") == "toml" {
				block = &configExample{where: where}
			}
		default:
			for _, m := range inlineSetting.FindAllStringSubmatch(line, -1) {
				out = append(out, configExample{where: where, body: m[1] + "\n"})
			}
		}
	}
	return out
}

// leaves are the errors err is made of.
func leaves(err error) []error {
	switch e := err.(type) {
	case interface{ Unwrap() []error }:
		var out []error
		for _, inner := range e.Unwrap() {
			out = append(out, leaves(inner)...)
		}
		return out
	case interface{ Unwrap() error }:
		return leaves(e.Unwrap())
	}
	return []error{err}
}

// TestConfigExamples loads every config example of the documentation, as
// written, through the loader of worker run, so that the documentation
// cannot show a setting the worker refuses. Files an example names
// (credentials, CAs) need not exist here.
func TestConfigExamples(t *testing.T) {
	docs := []struct {
		path     string
		examples func(t *testing.T, path string) []configExample
	}{
		{"../../README.md", configExamples},
		{"../../docs/fleet.md", configExamples},
		{"../../docs/security.md", configExamples},
		{"../../deploy/worker.toml", func(t *testing.T, path string) []configExample {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			return []configExample{{where: path, body: string(b)}}
		}},
	}
	for _, doc := range docs {
		examples := doc.examples(t, doc.path)
		if len(examples) == 0 {
			t.Errorf("%s: no config example found", doc.path)
		}
		for _, ex := range examples {
			t.Run(strings.TrimPrefix(ex.where, "../../"), func(t *testing.T) {
				clearEnv(t)
				_, _, err := loadConfig("worker run", []string{"--config", writeConfig(t, ex.body)})
				for _, e := range leaves(err) {
					if e != nil && !errors.Is(e, fs.ErrNotExist) {
						t.Errorf("the worker refuses\n%s\n%v", ex.body, err)
						break
					}
				}
			})
		}
	}
}
