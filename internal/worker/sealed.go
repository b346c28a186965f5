package worker

import (
	"errors"
	"fmt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/runners"
	"github.com/stretchy-ci/libvirt-worker/pkg/seal"
)

// Sealed runner secrets (docs/protocol.md 3.13): a provision may carry its
// runner's secret sealed to a key of this worker's. The worker opens it
// when it serves the request, and the secret exists in the clear only in
// its memory and, at the runner's start, in the guest.

// Unsealer opens sealed runner secrets. *seal.Keyring implements it; its
// errors wrap seal.ErrUnknownKey or seal.ErrInvalid.
type Unsealer interface {
	Open(s messages.SealedSecret, jobID string) (string, error)
}

// unseal opens req's sealed runner secret into the kind's secret field,
// or refuses a secret in the clear on a host that takes sealed ones only;
// code is the failed event's then.
func (w *Worker) unseal(req *messages.Provision) (code messages.ErrorCode, err error) {
	r := &req.Runner
	if r.Sealed == nil {
		if w.cfg.RequireSealed && len(runners.Secrets(*r)) > 0 {
			return messages.CodeSecretNotSealed, fmt.Errorf("the %s secret is in the clear; this host takes sealed runner secrets only (--require-sealed-secrets, docs/protocol.md 3.13)", r.Kind)
		}
		return "", nil
	}
	keys := w.cfg.Keys
	if keys == nil {
		keys = seal.NewKeyring()
	}
	secret, err := keys.Open(*r.Sealed, req.JobID)
	switch {
	case errors.Is(err, seal.ErrUnknownKey):
		return messages.CodeUnknownSealKey, err
	case err != nil:
		return messages.CodeSealedSecretInvalid, err
	}
	if err := runners.Unseal(r, secret); err != nil {
		return messages.CodeInvalidRequest, err
	}
	return "", nil
}
