package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// defaultKeysDir is where worker run and worker keys keep the sealing
// keys (docs/protocol.md 3.13).
const defaultKeysDir = "/etc/stretchy/keys"

const keysUsage = `usage: worker keys generate [--keys-dir DIR]
       worker keys list     [--keys-dir DIR]

generate makes a new sealing key for runner secrets in DIR (default ` + defaultKeysDir + `,
STRETCHY_KEYS_DIR) and prints its id and public key; copy the key file to every
host of the fleet that should open secrets sealed to it. list prints the keys
worker run would load, newest (preferred) first, or why it would refuse them`

// keysCommand manages the sealing keys of this host.
func keysCommand(args []string, out io.Writer) error {
	if len(args) == 0 {
		return errors.New(keysUsage)
	}
	op, args := args[0], args[1:]
	fs := flag.NewFlagSet("worker keys "+op, flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprintf(fs.Output(), "%s\n\nflags:\n", keysUsage); fs.PrintDefaults() }
	dir := fs.String("keys-dir", envString("STRETCHY_KEYS_DIR", defaultKeysDir), "directory of the sealing keys (STRETCHY_KEYS_DIR)")
	switch op {
	case "-h", "-help", "--help":
		fs.Usage()
		return flag.ErrHelp
	case "generate", "list":
	default:
		return fmt.Errorf("unknown keys command %q\n%s", op, keysUsage)
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q\n%s", fs.Arg(0), keysUsage)
	}
	switch op {
	case "generate":
		k, err := seal.Generate(rand.Reader)
		if err != nil {
			return err
		}
		path, err := seal.WriteKey(*dir, k)
		if err != nil {
			return err
		}
		fmt.Fprintf(out, "key %s written to %s (mode 0600)\npublic key (base64): %s\n", k.ID, path, base64.StdEncoding.EncodeToString(k.Public[:]))
		fmt.Fprintf(out, "worker run lists it in its host record from its next start; keep the file secret.\n")
		return nil
	default:
		kr, err := seal.LoadDir(*dir)
		if err != nil {
			return err
		}
		if kr.Len() == 0 {
			fmt.Fprintf(out, "no sealing keys in %s (worker keys generate makes one)\n", *dir)
			return nil
		}
		tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tPUBLIC KEY (BASE64)\tFILE")
		for _, k := range kr.Keys() {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", k.ID, base64.StdEncoding.EncodeToString(k.Public[:]), k.Path)
		}
		return tw.Flush()
	}
}

// stdout is where keysCommand writes.
var stdout io.Writer = os.Stdout
