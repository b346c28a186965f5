package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
)

// secret holds a credential taken from the environment. It prints as
// "REDACTED" so that a Config printed or logged by mistake shows no secret.
type secret string

func (secret) String() string                 { return "REDACTED" }
func (secret) GoString() string               { return `"REDACTED"` }
func (secret) LogValue() slog.Value           { return slog.StringValue("REDACTED") }
func (s secret) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// NATSAuth is how a command authenticates to NATS and secures the
// connection. Every command that connects registers it, so the same flags
// and environment variables work for run, submit and events. At most one
// authentication method may be given; TLS combines with any of them.
// Secrets are read from files or the environment, never from flag values,
// so that they stay out of process lists and shell history.
type NATSAuth struct {
	// EmbeddedDir, when set, is the --nats-data-dir of a worker on this
	// host: with no other credentials and every URL on loopback, the
	// command authenticates with that worker's embedded server's
	// credentials (docs/security.md 1.1). It is not one of the methods:
	// it applies only when none is given.
	EmbeddedDir  string
	User         string
	Password     secret // STRETCHY_NATS_PASSWORD only
	PasswordFile string
	Token        secret // STRETCHY_NATS_TOKEN only
	TokenFile    string
	NKeySeedFile string
	CredsFile    string
	TLSCA        string
	TLSCert      string
	TLSKey       string
}

func (a *NATSAuth) register(fs *flag.FlagSet) {
	a.Password = secret(os.Getenv("STRETCHY_NATS_PASSWORD"))
	a.Token = secret(os.Getenv("STRETCHY_NATS_TOKEN"))
	fs.StringVar(&a.User, "nats-user", envString("STRETCHY_NATS_USER", ""), "NATS user name; the password comes from STRETCHY_NATS_PASSWORD or --nats-password-file (STRETCHY_NATS_USER)")
	fs.StringVar(&a.PasswordFile, "nats-password-file", envString("STRETCHY_NATS_PASSWORD_FILE", ""), "file holding the password of --nats-user (STRETCHY_NATS_PASSWORD_FILE)")
	fs.StringVar(&a.TokenFile, "nats-token-file", envString("STRETCHY_NATS_TOKEN_FILE", ""), "file holding a NATS token; or set STRETCHY_NATS_TOKEN (STRETCHY_NATS_TOKEN_FILE)")
	fs.StringVar(&a.NKeySeedFile, "nats-nkey-seed", envString("STRETCHY_NATS_NKEY_SEED_FILE", ""), "file holding a NATS user nkey seed (SU...) (STRETCHY_NATS_NKEY_SEED_FILE)")
	fs.StringVar(&a.CredsFile, "nats-creds", envString("STRETCHY_NATS_CREDS", ""), "NATS .creds file: user JWT and nkey seed, as nsc writes it (STRETCHY_NATS_CREDS)")
	fs.StringVar(&a.TLSCA, "nats-tls-ca", envString("STRETCHY_NATS_TLS_CA", ""), "PEM file of the CA(s) that signed the NATS server's certificate; implies TLS (STRETCHY_NATS_TLS_CA)")
	fs.StringVar(&a.TLSCert, "nats-tls-cert", envString("STRETCHY_NATS_TLS_CERT", ""), "PEM client certificate for NATS, with --nats-tls-key; implies TLS (STRETCHY_NATS_TLS_CERT)")
	fs.StringVar(&a.TLSKey, "nats-tls-key", envString("STRETCHY_NATS_TLS_KEY", ""), "PEM private key of --nats-tls-cert (STRETCHY_NATS_TLS_KEY)")
}

// Validate checks the settings against the server URL(s) they are for:
// one authentication method, complete and readable, and usable TLS files.
// It names the flag and file at fault, never a secret.
func (a NATSAuth) Validate(urls string) error {
	_, err := a.options(urls)
	return err
}

// given lists the flags and variables set, for messages about them.
func (a NATSAuth) given() []string {
	var g []string
	for _, f := range []struct {
		set  bool
		name string
	}{
		{a.User != "", "--nats-user"}, {a.Password != "", "STRETCHY_NATS_PASSWORD"},
		{a.PasswordFile != "", "--nats-password-file"}, {a.Token != "", "STRETCHY_NATS_TOKEN"},
		{a.TokenFile != "", "--nats-token-file"}, {a.NKeySeedFile != "", "--nats-nkey-seed"},
		{a.CredsFile != "", "--nats-creds"}, {a.TLSCA != "", "--nats-tls-ca"},
		{a.TLSCert != "", "--nats-tls-cert"}, {a.TLSKey != "", "--nats-tls-key"},
	} {
		if f.set {
			g = append(g, f.name)
		}
	}
	return g
}

// Authentication methods, named by the flags that select them.
const (
	authNone  = ""
	authUser  = "--nats-user"
	authToken = "--nats-token-file/STRETCHY_NATS_TOKEN"
	authNKey  = "--nats-nkey-seed"
	authCreds = "--nats-creds"
	authURL   = "credentials in --nats-url"
	// authEmbedded is no flag: the credentials of the embedded server in
	// EmbeddedDir, used when none is given.
	authEmbedded = "the embedded server's credentials"
)

// methods lists the authentication methods given.
func (a NATSAuth) methods(urls string) []string {
	var m []string
	if a.User != "" || a.Password != "" || a.PasswordFile != "" {
		m = append(m, authUser)
	}
	if a.Token != "" || a.TokenFile != "" {
		m = append(m, authToken)
	}
	if a.NKeySeedFile != "" {
		m = append(m, authNKey)
	}
	if a.CredsFile != "" {
		m = append(m, authCreds)
	}
	if urlHasCredentials(urls) {
		m = append(m, authURL)
	}
	return m
}

func urlHasCredentials(urls string) bool {
	for _, s := range strings.Split(urls, ",") {
		if u, err := url.Parse(strings.TrimSpace(s)); err == nil && u.User != nil {
			return true
		}
	}
	return false
}

func (a NATSAuth) method(urls string) string {
	if m := a.methods(urls); len(m) > 0 {
		return m[0]
	}
	if e := a.embedded(urls); e.applies && e.err == nil {
		return authEmbedded
	}
	return authNone
}

// embeddedCredentials says whether a connection authenticates with the
// credentials of a worker's embedded server, and with which.
type embeddedCredentials struct {
	// applies: EmbeddedDir is set, no other credentials or TLS settings
	// are given, and every URL is on loopback, where worker run's
	// embedded server listens.
	applies bool
	path    string
	creds   embedded.Credentials
	// err is why they could not be read, when they apply.
	err error
}

func (a NATSAuth) embedded(urls string) embeddedCredentials {
	if a.EmbeddedDir == "" || len(a.given()) > 0 || urlHasCredentials(urls) || !onLoopback(urls) {
		return embeddedCredentials{}
	}
	e := embeddedCredentials{applies: true, path: embedded.CredentialsPath(a.EmbeddedDir)}
	e.creds, e.err = embedded.LoadCredentials(a.EmbeddedDir)
	return e
}

// unreadable tells whether the embedded server's credentials are simply
// not there for this user: no worker ran with this data directory, or the
// user may not read it. The command then connects without credentials,
// as it would to another server on loopback; explainConnect says why when
// the server wants some.
func (e embeddedCredentials) unreadable() bool {
	return errors.Is(e.err, fs.ErrNotExist) || errors.Is(e.err, fs.ErrPermission)
}

// onLoopback tells whether every server of urls is on this host's
// loopback.
func onLoopback(urls string) bool {
	for _, s := range strings.Split(urls, ",") {
		s = strings.TrimSpace(s)
		if !strings.Contains(s, "://") {
			s = "nats://" + s
		}
		u, err := url.Parse(s)
		if err != nil {
			return false
		}
		if h := u.Hostname(); h != "localhost" {
			if ip := net.ParseIP(h); ip == nil || !ip.IsLoopback() {
				return false
			}
		}
	}
	return true
}

// options turns the settings into nats.go options, reading and checking
// every file once so that a mistake shows before the first dial.
func (a NATSAuth) options(urls string) ([]nats.Option, error) {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	var opts []nats.Option

	methods := a.methods(urls)
	if len(methods) > 1 {
		bad("NATS authentication: %s given at once; use one", strings.Join(methods, " and "))
	}
	if a.User != "" || a.Password != "" || a.PasswordFile != "" {
		password := string(a.Password)
		switch {
		case a.User == "":
			bad("STRETCHY_NATS_PASSWORD or --nats-password-file needs --nats-user")
		case a.Password != "" && a.PasswordFile != "":
			bad("--nats-user %q: give the password in STRETCHY_NATS_PASSWORD or --nats-password-file, not both", a.User)
		case a.PasswordFile != "":
			p, err := readSecretFile("--nats-password-file", a.PasswordFile, false)
			if err != nil {
				errs = append(errs, err)
			}
			password = p
		case a.Password == "":
			bad("--nats-user %q needs a password: set STRETCHY_NATS_PASSWORD or --nats-password-file", a.User)
		}
		opts = append(opts, nats.UserInfo(a.User, password))
	}
	if a.Token != "" || a.TokenFile != "" {
		token := string(a.Token)
		if a.Token != "" && a.TokenFile != "" {
			bad("give the NATS token in STRETCHY_NATS_TOKEN or --nats-token-file, not both")
		} else if a.TokenFile != "" {
			t, err := readSecretFile("--nats-token-file", a.TokenFile, true)
			if err != nil {
				errs = append(errs, err)
			}
			token = t
		}
		opts = append(opts, nats.Token(token))
	}
	if a.NKeySeedFile != "" {
		// nats.go reads the seed again for every signature, so a rotated
		// file is picked up on reconnect; check it once now.
		if _, err := a.nkeyPublic(); err != nil {
			errs = append(errs, err)
		} else if o, err := nats.NkeyOptionFromSeed(a.NKeySeedFile); err != nil {
			bad("--nats-nkey-seed %s: %w", a.NKeySeedFile, err)
		} else {
			opts = append(opts, o)
		}
	}
	if a.CredsFile != "" {
		if err := checkCreds(a.CredsFile); err != nil {
			errs = append(errs, err)
		}
		// Read again at every connect, so that renewed credentials apply.
		opts = append(opts, nats.UserCredentials(a.CredsFile))
	}
	if tc, err := a.tlsConfig(); err != nil {
		errs = append(errs, err)
	} else if tc != nil {
		opts = append(opts, nats.Secure(tc))
	}
	if e := a.embedded(urls); e.applies {
		switch {
		case e.err == nil:
			// The seed is read for each signature, never kept.
			opts = append(opts, nats.Nkey(e.creds.PublicKey(), e.creds.Sign))
		case !e.unreadable():
			errs = append(errs, e.err)
		}
	}
	return opts, errors.Join(errs...)
}

// readSecretFile reads a password or token. The error names the flag and
// the path; the content is never part of it.
func readSecretFile(flagName, path string, trimSpace bool) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", flagName, err)
	}
	s := strings.TrimRight(string(b), "\r\n")
	if trimSpace {
		s = strings.TrimSpace(s)
	}
	if s == "" {
		return "", fmt.Errorf("%s %s: the file is empty", flagName, path)
	}
	return s, nil
}

// nkeyPublic returns the public key of the nkey seed file, which names the
// user to the server administrator.
func (a NATSAuth) nkeyPublic() (string, error) {
	b, err := os.ReadFile(a.NKeySeedFile)
	if err != nil {
		return "", fmt.Errorf("--nats-nkey-seed: %w", err)
	}
	defer clear(b)
	kp, err := nkeys.ParseDecoratedUserNKey(b)
	if err != nil {
		return "", fmt.Errorf("--nats-nkey-seed %s: no user nkey seed (SU...) found", a.NKeySeedFile)
	}
	defer kp.Wipe()
	pub, err := kp.PublicKey()
	if err != nil {
		return "", fmt.Errorf("--nats-nkey-seed %s: %w", a.NKeySeedFile, err)
	}
	return pub, nil
}

// checkCreds checks that a .creds file holds a user JWT that has not
// expired and a user nkey seed.
func checkCreds(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("--nats-creds: %w", err)
	}
	defer clear(b)
	raw, err := nkeys.ParseDecoratedJWT(b)
	if err != nil {
		return fmt.Errorf("--nats-creds %s: no user JWT found", path)
	}
	claims, err := jwt.DecodeUserClaims(raw)
	if err != nil {
		return fmt.Errorf("--nats-creds %s: no valid user JWT found", path)
	}
	if claims.Expires > 0 && time.Unix(claims.Expires, 0).Before(time.Now()) {
		return fmt.Errorf("--nats-creds %s: the user JWT expired at %s", path, time.Unix(claims.Expires, 0).UTC().Format(time.RFC3339))
	}
	kp, err := nkeys.ParseDecoratedUserNKey(b)
	if err != nil {
		return fmt.Errorf("--nats-creds %s: no user nkey seed found", path)
	}
	kp.Wipe()
	return nil
}

// tlsConfig is nil when no TLS flag is given; tls:// URLs then use the
// system's CAs.
func (a NATSAuth) tlsConfig() (*tls.Config, error) {
	if a.TLSCA == "" && a.TLSCert == "" && a.TLSKey == "" {
		return nil, nil
	}
	var errs []error
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if a.TLSCA != "" {
		pem, err := os.ReadFile(a.TLSCA)
		if err != nil {
			errs = append(errs, fmt.Errorf("--nats-tls-ca: %w", err))
		} else {
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				errs = append(errs, fmt.Errorf("--nats-tls-ca %s: no PEM certificate found", a.TLSCA))
			}
			tc.RootCAs = pool
		}
	}
	switch {
	case a.TLSCert != "" && a.TLSKey == "":
		errs = append(errs, fmt.Errorf("--nats-tls-cert %s needs --nats-tls-key", a.TLSCert))
	case a.TLSCert == "" && a.TLSKey != "":
		errs = append(errs, fmt.Errorf("--nats-tls-key %s needs --nats-tls-cert", a.TLSKey))
	case a.TLSCert != "":
		if _, err := tls.LoadX509KeyPair(a.TLSCert, a.TLSKey); err != nil {
			errs = append(errs, fmt.Errorf("--nats-tls-cert %s, --nats-tls-key %s: %w", a.TLSCert, a.TLSKey, err))
		}
		// Loaded at every handshake, so that a renewed certificate is
		// used from the next reconnect on.
		cert, key := a.TLSCert, a.TLSKey
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := tls.LoadX509KeyPair(cert, key)
			if err != nil {
				return nil, fmt.Errorf("load client certificate %s: %w", cert, err)
			}
			return &c, nil
		}
	}
	return tc, errors.Join(errs...)
}

// defaultNATSDataDir is worker run's --nats-data-dir, where the other
// commands look for its embedded server's credentials.
const defaultNATSDataDir = "/var/lib/stretchy-worker/nats"

// natsFlags are the NATS settings of the client commands, which connect
// through pkg/client. Their defaults are worker run's embedded server on
// this host: the loopback port of STRETCHY_NATS_PORT, the credentials in
// STRETCHY_NATS_DATA_DIR, so that the same environment serves both
// (docs/security.md 1.1); and the inbox prefix of the command's role
// (docs/security.md 2).
type natsFlags struct {
	URL         string
	Auth        NATSAuth
	InboxPrefix string
	role        client.Role
}

// role is whom a command acts for, which names its inboxes.
type role struct {
	role client.Role
	// env is the variable that changes the role's inbox prefix.
	env string
}

var (
	// orchestratorRole: worker submit and worker events.
	orchestratorRole = role{client.Orchestrator, "STRETCHY_ORCHESTRATOR_INBOX_PREFIX"}
	// operatorRole: worker hosts, drain, undrain, hold, release and
	// console; worker run's --operator-inbox-prefix is the same setting.
	operatorRole = role{client.Operator, "STRETCHY_OPERATOR_INBOX_PREFIX"}
)

func (f *natsFlags) register(fs *flag.FlagSet, r role) {
	f.role = r.role
	fs.StringVar(&f.InboxPrefix, "inbox-prefix", envString(r.env, r.role.InboxPrefix()),
		"prefix of the inboxes where the replies to this command's requests arrive; its NATS user must be allowed to subscribe to PREFIX.> ("+r.env+")")
	fs.StringVar(&f.URL, "nats-url", defaultNATSURL(), "NATS URL(s), comma separated; default: the embedded server of worker run on this host, "+
		"on 127.0.0.1 and STRETCHY_NATS_PORT (STRETCHY_NATS_URL)")
	f.Auth.register(fs)
	fs.StringVar(&f.Auth.EmbeddedDir, "nats-data-dir", envString("STRETCHY_NATS_DATA_DIR", defaultNATSDataDir),
		"--nats-data-dir of worker run on this host: given no other credentials, a URL on loopback is connected to with "+
			"its embedded server's credentials there (STRETCHY_NATS_DATA_DIR)")
}

// client connects the command name through pkg/client, in the role the
// flags were registered for. A refused permission ends the command's
// call at once with a *client.PermissionError; the server's other
// asynchronous errors go to stderr.
func (f natsFlags) client(name string, opts ...client.Option) (*client.Client, error) {
	if err := checkInboxPrefix(f.InboxPrefix); err != nil {
		return nil, fmt.Errorf("--inbox-prefix %q: %w", f.InboxPrefix, err)
	}
	nopts, err := f.Auth.options(f.URL)
	if err != nil {
		return nil, err
	}
	c, err := client.Connect(f.URL, append([]client.Option{
		client.WithName(name), client.WithRole(f.role), client.WithInboxPrefix(f.InboxPrefix),
		client.WithNATSOptions(nopts...),
		client.WithErrorHandler(func(err error) {
			if !errors.Is(err, nats.ErrPermissionViolation) { // those become the command's error
				fmt.Fprintln(os.Stderr, err)
			}
		}),
	}, opts...)...)
	var ce *client.ConnectError
	if errors.As(err, &ce) {
		return nil, fmt.Errorf("connect to nats %s: %w", ce.URLs, f.Auth.explainConnect(f.URL, ce.Err))
	}
	return c, err
}

// checkInboxPrefix says what makes p no inbox prefix
// (client.CheckInboxPrefix).
func checkInboxPrefix(p string) error { return client.CheckInboxPrefix(p) }

// defaultNATSURL is STRETCHY_NATS_URL, or where worker run's embedded
// server listens: 127.0.0.1, port STRETCHY_NATS_PORT or 4222.
func defaultNATSURL() string {
	if u, ok := os.LookupEnv("STRETCHY_NATS_URL"); ok {
		return u
	}
	return "nats://127.0.0.1:" + envString("STRETCHY_NATS_PORT", "4222")
}

// natsClient says who connects and how the connection behaves.
type natsClient struct {
	// Name is shown in the server's connection list.
	Name string
	// Log, when set, receives disconnects, reconnects and asynchronous
	// errors. Without it, permissions violations are left to explain and
	// other asynchronous errors go to stderr.
	Log *slog.Logger
	// Reconnect keeps reconnecting for as long as the process runs, as a
	// worker must; otherwise nats.go's default applies.
	Reconnect bool
	// NoEcho keeps the server from delivering the connection's own
	// publishes to its own subscriptions (docs/security.md).
	NoEcho bool
	// InboxPrefix is the prefix of the connection's inboxes, its role's
	// (docs/security.md 2); empty keeps nats.go's "_INBOX".
	InboxPrefix string
}

// workerClient is how worker run connects: reconnecting for as long as it
// runs, and without echo. The worker subscribes to subjects it also
// publishes to (the provision subjects it wakes up on, its control
// subject); nothing it does needs to receive its own messages.
func workerClient(host, inboxPrefix string, log *slog.Logger) natsClient {
	return natsClient{Name: "stretchy-libvirt-worker " + host, Log: log, Reconnect: true, NoEcho: true, InboxPrefix: inboxPrefix}
}

// natsConn is a NATS connection that remembers the server's first
// permissions violation. NATS reports those asynchronously, so the
// operation that caused one would otherwise just time out; failFast and
// explain turn it into that operation's error.
type natsConn struct {
	*nats.Conn
	violated context.Context // done, with the violation as its cause, after the first one
}

// connectNATS is the one place where the commands dial NATS. urls may be a
// comma-separated list and may carry credentials; they are redacted in
// errors and logs.
func connectNATS(urls string, auth NATSAuth, c natsClient) (*natsConn, jetstream.JetStream, error) {
	opts, err := auth.options(urls)
	if err != nil {
		return nil, nil, err
	}
	if p := c.InboxPrefix; p != "" {
		if err := checkInboxPrefix(p); err != nil {
			return nil, nil, fmt.Errorf("--inbox-prefix %q: %w", p, err)
		}
		opts = append(opts, nats.CustomInboxPrefix(p))
	}
	violated, violation := context.WithCancelCause(context.Background())
	conn := &natsConn{violated: violated}
	opts = append(opts,
		nats.Name(c.Name),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			if errors.Is(err, nats.ErrPermissionViolation) {
				err = permissionError(err)
				violation(err)
			}
			switch {
			case c.Log != nil:
				c.Log.Error("nats error", "error", err)
			case !errors.Is(err, nats.ErrPermissionViolation): // those become the command's error
				fmt.Fprintln(os.Stderr, err)
			}
		}),
	)
	if c.Reconnect {
		opts = append(opts, nats.MaxReconnects(-1))
	}
	if c.NoEcho {
		opts = append(opts, nats.NoEcho())
	}
	if c.Log != nil {
		log := c.Log
		opts = append(opts,
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				log.Warn("nats disconnected", "error", err)
			}),
			nats.ReconnectHandler(func(nc *nats.Conn) {
				log.Info("nats reconnected", "url", nc.ConnectedUrlRedacted())
			}),
		)
	}
	nc, err := nats.Connect(urls, opts...)
	if err != nil {
		violation(nil)
		return nil, nil, fmt.Errorf("connect to nats %s: %w", redactURL(urls), auth.explainConnect(urls, err))
	}
	conn.Conn = nc
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		violation(nil)
		return nil, nil, fmt.Errorf("jetstream: %w", err)
	}
	return conn, js, nil
}

// failFast returns a context that ends as soon as the server reports a
// permissions violation on this connection, so that a request it refused
// fails at once instead of timing out. Call stop when done.
func (c *natsConn) failFast(ctx context.Context) (_ context.Context, stop func()) {
	ctx, cancel := context.WithCancelCause(ctx)
	unhook := context.AfterFunc(c.violated, func() { cancel(context.Cause(c.violated)) })
	return ctx, func() {
		unhook()
		cancel(context.Canceled)
	}
}

// startupTimeout is how long a starting worker keeps trying to create or
// check its streams, consumers and buckets: a NATS cluster that was just
// started, or lost a node, answers 503 or not at all while it elects
// leaders and places new streams' replicas.
const startupTimeout = 2 * time.Minute

// settle runs step, which must be idempotent, until it succeeds; until the
// server refuses a permission, which no retry changes; until ctx ends; or
// until timeout has passed. Each attempt gets 20 s.
func (c *natsConn) settle(ctx context.Context, timeout time.Duration, log *slog.Logger, what string, step func(context.Context) error) error {
	deadline := time.Now().Add(timeout)
	backoff := 500 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, stop := c.failFast(ctx)
		actx, cancel := context.WithTimeout(actx, 20*time.Second)
		err := step(actx)
		cancel()
		stop()
		if err == nil {
			return nil
		}
		if context.Cause(c.violated) != nil || ctx.Err() != nil || time.Now().After(deadline) {
			return c.explain(err)
		}
		log.Warn("NATS is not ready yet, trying again", "step", what, "attempt", attempt, "error", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return c.explain(err)
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// explain puts the server's permissions violation, if there was one,
// before err: it is why err happened.
func (c *natsConn) explain(err error) error {
	if err == nil {
		return nil
	}
	if v := context.Cause(c.violated); v != nil && errors.Is(v, nats.ErrPermissionViolation) {
		return fmt.Errorf("%w (%v)", v, err)
	}
	return err
}

// permissionError rewords the server's
// `Permissions Violation for Publish to "subject"` so that it names what
// the user lacks, as pkg/client does for the client commands.
func permissionError(err error) error { return client.PermissionViolation(err) }

// explainConnect adds to a failed connect what to check, by the
// authentication method in use.
func (a NATSAuth) explainConnect(urls string, err error) error {
	hint := ""
	// The server's wording differs in case from nats.go's sentinels; the
	// sentinel reads better before the hint and still matches errors.Is.
	for _, sentinel := range []error{nats.ErrAuthorization, nats.ErrAuthExpired, nats.ErrAuthRevoked, nats.ErrAccountAuthExpired} {
		if errors.Is(err, sentinel) {
			err = sentinel
		}
	}
	switch {
	case errors.Is(err, nats.ErrAuthorization):
		switch a.method(urls) {
		case authUser:
			hint = fmt.Sprintf("check --nats-user %q and its password (STRETCHY_NATS_PASSWORD or --nats-password-file)", a.User)
		case authToken:
			hint = "check the token (--nats-token-file or STRETCHY_NATS_TOKEN)"
		case authNKey:
			pub, _ := a.nkeyPublic()
			hint = fmt.Sprintf("the server does not accept the nkey %s of --nats-nkey-seed %s", pub, a.NKeySeedFile)
		case authCreds:
			hint = fmt.Sprintf("check --nats-creds %s: is its account known to the server, its user allowed?", a.CredsFile)
		case authURL:
			hint = "check the credentials in --nats-url"
		case authEmbedded:
			hint = fmt.Sprintf("the server refused the embedded server's credentials %s: what listens there is not the embedded server "+
				"of the worker whose --nats-data-dir is %s (give that worker's), or it replaced them since; or give other credentials",
				embedded.CredentialsPath(a.EmbeddedDir), a.EmbeddedDir)
		default:
			hint = "the server wants credentials: give --nats-user, --nats-token-file, --nats-nkey-seed or --nats-creds"
			if e := a.embedded(urls); e.applies && errors.Is(e.err, fs.ErrNotExist) {
				hint += fmt.Sprintf("; for the embedded server of worker run on this host, the commands use its credentials, but there are none in %s: "+
					"give the worker's --nats-data-dir (STRETCHY_NATS_DATA_DIR)", e.path)
			} else if e.applies && errors.Is(e.err, fs.ErrPermission) {
				hint += fmt.Sprintf("; for the embedded server of worker run on this host, the commands use its credentials %s, "+
					"which this user may not read: run the command as root or as the worker's user", e.path)
			}
		}
		if a.TLSCert != "" {
			hint += ", or the user mapped from --nats-tls-cert " + a.TLSCert
		}
	case errors.Is(err, nats.ErrAuthExpired), errors.Is(err, nats.ErrAccountAuthExpired):
		hint = "renew the credentials (--nats-creds)"
	case errors.Is(err, nats.ErrAuthRevoked):
		hint = "the server revoked this user"
	case errors.Is(err, nats.ErrSecureConnRequired):
		hint = "the server requires TLS: use a tls:// URL, and --nats-tls-ca for a private CA"
	case errors.Is(err, nats.ErrSecureConnWanted):
		hint = "the server does not offer TLS on this port; --nats-tls-ca, --nats-tls-cert and tls:// URLs need it"
	case isUnknownAuthority(err):
		hint = "the server's certificate is not signed by a CA this host trusts: give it with --nats-tls-ca"
	case tlsRefused(err) && a.TLSCert == "":
		hint = "the server wants a client certificate: give --nats-tls-cert and --nats-tls-key"
	case tlsRefused(err):
		hint = fmt.Sprintf("the server refused the client certificate --nats-tls-cert %s: is it signed by a CA the server trusts, and valid?", a.TLSCert)
	}
	if hint == "" {
		return err
	}
	return fmt.Errorf("%w: %s", err, hint)
}

// tlsRefused tells whether the server ended the connection right after the
// TLS handshake, as it does with a client certificate it does not accept
// (or none): with TLS 1.3 the client learns it from the server's alert or,
// depending on timing, only from the closed connection.
func tlsRefused(err error) bool {
	s := err.Error()
	return strings.Contains(s, "remote error: tls:") || strings.Contains(s, "closed by remote after TLS handshake")
}

func isUnknownAuthority(err error) bool {
	var ua x509.UnknownAuthorityError
	return errors.As(err, &ua)
}
