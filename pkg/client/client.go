package client

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Client is a connection to the NATS deployment of the libvirt workers, in
// one role (Orchestrator by default). It is safe for concurrent use; its
// methods take a context that bounds them.
type Client struct {
	js  jetstream.JetStream
	nc  *nats.Conn
	own bool // Close closes nc
	by  string

	// violated is done, with the violation as its cause, after the
	// server's first permissions violation on a connection Connect made;
	// nil for New's.
	violated context.Context

	mu            sync.Mutex
	hosts, drains jetstream.KeyValue // bound on first use
}

// Option configures Connect (every option) or New (WithIdentity only: the
// connection is made already).
type Option func(*options)

type options struct {
	name, inbox, by  string
	inboxSet         bool
	role             Role
	nats             []nats.Option
	nkeySeed         string
	tlsCA, tlsCert   string
	tlsKey           string
	onError          func(error)
	credentialsGiven []string
}

// WithName names the connection in the server's connection list.
func WithName(name string) Option { return func(o *options) { o.name = name } }

// WithRole picks the role the client acts in, and with it the default
// inbox prefix (Role.InboxPrefix) and the permissions its NATS user needs
// (Role.Permissions). The default is Orchestrator.
func WithRole(r Role) Option { return func(o *options) { o.role = r } }

// WithInboxPrefix replaces the role's inbox prefix (docs/security.md 2.0),
// for a NATS user allowed to subscribe to another prefix. A worker answers
// control requests only under its --operator-inbox-prefix.
func WithInboxPrefix(prefix string) Option {
	return func(o *options) { o.inbox, o.inboxSet = prefix, true }
}

// WithCredsFile authenticates with a .creds file (user JWT and nkey seed,
// as nsc writes it), read again at every connect so that renewed
// credentials apply.
func WithCredsFile(path string) Option {
	return func(o *options) {
		o.nats = append(o.nats, nats.UserCredentials(path))
		o.credentialsGiven = append(o.credentialsGiven, "creds file")
	}
}

// WithNKeySeedFile authenticates with the user nkey seed (SU...) in path,
// read again for every signature.
func WithNKeySeedFile(path string) Option {
	return func(o *options) {
		o.nkeySeed = path
		o.credentialsGiven = append(o.credentialsGiven, "nkey seed")
	}
}

// WithUserInfo authenticates with a user name and password.
func WithUserInfo(user, password string) Option {
	return func(o *options) {
		o.nats = append(o.nats, nats.UserInfo(user, password))
		o.credentialsGiven = append(o.credentialsGiven, "user and password")
	}
}

// WithToken authenticates with a token.
func WithToken(token string) Option {
	return func(o *options) {
		o.nats = append(o.nats, nats.Token(token))
		o.credentialsGiven = append(o.credentialsGiven, "token")
	}
}

// WithTLS secures the connection with TLS: caFile (PEM, may be empty for
// the system's CAs) verifies the server, certFile and keyFile (both or
// neither) are the client's certificate.
func WithTLS(caFile, certFile, keyFile string) Option {
	return func(o *options) { o.tlsCA, o.tlsCert, o.tlsKey = caFile, certFile, keyFile }
}

// WithTLSConfig secures the connection with tc.
func WithTLSConfig(tc *tls.Config) Option {
	return func(o *options) { o.nats = append(o.nats, nats.Secure(tc)) }
}

// WithNATSOptions passes further nats.go options to nats.Connect, such as
// nats.MaxReconnects(-1) for a client that must outlast any outage, or
// nats.Nkey for credentials held elsewhere. They apply before the client's
// own (name, inbox prefix, error handler), which win.
func WithNATSOptions(opts ...nats.Option) Option {
	return func(o *options) { o.nats = append(o.nats, opts...) }
}

// WithErrorHandler receives the errors the server reports asynchronously,
// permissions violations as *PermissionError. Without it they are
// dropped; a violation also ends the operation that caused it (at once,
// instead of at its timeout).
func WithErrorHandler(fn func(error)) Option { return func(o *options) { o.onError = fn } }

// WithIdentity says who acts through the client, for people: it is
// recorded with drain requests (unless Drain is given another) and sent
// with control requests, which the worker logs. Empty by default.
func WithIdentity(by string) Option { return func(o *options) { o.by = by } }

// ConnectError is a failed Connect: the servers, credentials in their URLs
// redacted, and why. It matches ErrUnreachable when no server could be
// reached.
type ConnectError struct {
	URLs string
	Err  error
}

func (e *ConnectError) Error() string { return "connect to nats " + e.URLs + ": " + e.Err.Error() }

func (e *ConnectError) Unwrap() error { return e.Err }

// Is reports whether the connection failed for want of a server.
func (e *ConnectError) Is(target error) bool {
	return target == ErrUnreachable && (unanswered(e.Err) || isNetError(e.Err))
}

// Connect dials NATS at urls (comma separated; credentials in a URL are
// allowed and redacted in errors) and returns a client. Like nats.Connect
// it takes no context: nats.go bounds the dial (2 s per server). Close the
// client when done.
func Connect(urls string, opts ...Option) (*Client, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	inbox := o.role.InboxPrefix()
	if o.inboxSet {
		inbox = o.inbox
	}
	if err := CheckInboxPrefix(inbox); err != nil {
		return nil, fmt.Errorf("inbox prefix %q: %w", inbox, err)
	}
	nopts := append([]nats.Option(nil), o.nats...)
	if o.nkeySeed != "" {
		nk, err := nats.NkeyOptionFromSeed(o.nkeySeed)
		if err != nil {
			return nil, fmt.Errorf("nkey seed %s: %w", o.nkeySeed, err)
		}
		nopts = append(nopts, nk)
	}
	if o.tlsCA != "" {
		nopts = append(nopts, nats.RootCAs(o.tlsCA))
	}
	if o.tlsCert != "" || o.tlsKey != "" {
		nopts = append(nopts, nats.ClientCert(o.tlsCert, o.tlsKey))
	}
	if len(o.credentialsGiven) > 1 {
		return nil, fmt.Errorf("authentication: %s given at once; use one", strings.Join(o.credentialsGiven, " and "))
	}
	violated, violation := context.WithCancelCause(context.Background())
	onError := o.onError
	nopts = append(nopts, nats.CustomInboxPrefix(inbox),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				err = PermissionViolation(err)
				violation(err)
			}
			if onError != nil {
				onError(err)
			}
		}))
	if o.name != "" {
		nopts = append(nopts, nats.Name(o.name))
	}
	nc, err := nats.Connect(urls, nopts...)
	if err != nil {
		violation(nil)
		return nil, &ConnectError{URLs: redactURLs(urls), Err: err}
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		violation(nil)
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	return &Client{js: js, nc: nc, own: true, by: o.by, violated: violated}, nil
}

// New returns a client over a connection the caller made and keeps (with
// its inbox prefix, which must be the role's, and its own error handler:
// a permissions violation then ends the operation at its context's
// deadline rather than at once; PermissionViolation rewords it). Of the
// options only WithIdentity applies.
func New(js jetstream.JetStream, opts ...Option) *Client {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	return &Client{js: js, nc: js.Conn(), by: o.by}
}

// Close closes the connection Connect made; a client from New leaves its
// connection open.
func (c *Client) Close() {
	if c.own {
		c.nc.Close()
	}
}

// guard returns a context that also ends at the server's first
// permissions violation on the connection, so that a request it refused
// fails at once instead of timing out. Call stop when done.
func (c *Client) guard(ctx context.Context) (_ context.Context, stop func()) {
	if c.violated == nil {
		return ctx, func() {}
	}
	ctx, cancel := context.WithCancelCause(ctx)
	unhook := context.AfterFunc(c.violated, func() { cancel(context.Cause(c.violated)) })
	return ctx, func() {
		unhook()
		cancel(context.Canceled)
	}
}

// violation is the server's first permissions violation on the
// connection, if there was one.
func (c *Client) violation() error {
	if c.violated == nil {
		return nil
	}
	if v := context.Cause(c.violated); v != nil && errors.Is(v, nats.ErrPermissionViolation) {
		return v
	}
	return nil
}

// fail is the error a request-reply operation (what) returns for err: the
// permissions violation that caused it first, ErrNotSetUp or
// ErrUnreachable where they apply.
func (c *Client) fail(what string, err error) error {
	if v := c.violation(); v != nil {
		return fmt.Errorf("%w (%s: %v)", v, what, err)
	}
	switch {
	case notSetUp(err):
		return fmt.Errorf("%s: %w: %w", what, ErrNotSetUp, err)
	case unanswered(err) || isNetError(err):
		return fmt.Errorf("%s: %w: %w", what, ErrUnreachable, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// failStream is fail for the event iterators and Wait, which return the
// caller's context's own error when it ended.
func (c *Client) failStream(ctx context.Context, what string, err error) error {
	if c.violation() == nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return c.fail(what, err)
}

// isNetError reports a failed dial (nothing listens, the network is down)
// or a name that does not resolve; not a TLS handshake that the server
// refused, which is the credentials' fault.
func isNetError(err error) bool {
	var op *net.OpError
	var dns *net.DNSError
	return errors.As(err, &op) && (op.Op == "dial" || op.Timeout()) || errors.As(err, &dns)
}

// redactURLs masks the credentials of URLs in a comma-separated list.
func redactURLs(s string) string {
	parts := strings.Split(s, ",")
	for i, p := range parts {
		if at := strings.LastIndex(p, "@"); at >= 0 {
			if scheme := strings.Index(p, "://"); scheme >= 0 && scheme < at {
				parts[i] = p[:scheme+3] + "REDACTED@" + p[at+1:]
			}
		}
	}
	return strings.Join(parts, ",")
}
