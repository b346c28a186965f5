package main

import (
	"crypto/rand"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"text/tabwriter"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
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

// sealMode is when worker submit seals a provision's runner secret.
type sealMode string

const (
	sealAuto   sealMode = "auto"   // when every host that may serve it lists a common key
	sealAlways sealMode = "always" // or refuse to submit
	sealNever  sealMode = "never"
)

// sealFor seals the secret of req's runner, in place, to a key that every
// host that may serve the request lists in its record (the pinned host;
// else every active host that carries the image), the first host's
// preferred key first. It reports whether it sealed; with sealAuto and no
// such key it leaves the secret in the clear.
func sealFor(req *messages.Provision, hosts []messages.Host, pinned string, mode sealMode) (bool, error) {
	secrets := runners.Secrets(req.Runner)
	if mode == sealNever || len(secrets) == 0 {
		return false, nil
	}
	key, ok := commonKey(hosts, pinned, req.Image)
	if !ok {
		if mode == sealAlways {
			return false, fmt.Errorf("--seal always: no sealing key is listed by every host that may serve image %q (worker keys generate on each, or copy one key to all)", req.Image)
		}
		return false, nil
	}
	s, err := seal.Seal(key, req.JobID, secrets[0], rand.Reader)
	if err != nil {
		return false, err
	}
	if err := runners.Unseal(&req.Runner, ""); err != nil {
		return false, err
	}
	req.Runner.Sealed = &s
	return true, nil
}

// commonKey returns the first key of the first candidate host that every
// candidate lists.
func commonKey(hosts []messages.Host, pinned, image string) (messages.SealKey, bool) {
	var candidates []messages.Host
	for _, h := range hosts {
		switch {
		case pinned != "":
			if h.Host == pinned {
				candidates = append(candidates, h)
			}
		case h.State == messages.HostActive && slices.ContainsFunc(h.Images, func(im messages.HostImage) bool { return im.Name == image }):
			candidates = append(candidates, h)
		}
	}
	if len(candidates) == 0 {
		return messages.SealKey{}, false
	}
	for _, k := range candidates[0].SealKeys {
		if messages.SealKeyID(k.Public) != k.ID {
			continue
		}
		all := true
		for _, h := range candidates[1:] {
			if !slices.ContainsFunc(h.SealKeys, func(o messages.SealKey) bool { return o.ID == k.ID && string(o.Public) == string(k.Public) }) {
				all = false
				break
			}
		}
		if all {
			return k, true
		}
	}
	return messages.SealKey{}, false
}

// stdout is where keysCommand writes.
var stdout io.Writer = os.Stdout
