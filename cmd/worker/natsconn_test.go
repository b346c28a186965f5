package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/stretchy-ci/libvirt-worker/internal/bus"
	"github.com/stretchy-ci/libvirt-worker/internal/embedded"
	"github.com/stretchy-ci/libvirt-worker/internal/worker"
	"github.com/stretchy-ci/libvirt-worker/pkg/client"
	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
)

// startNATS starts a JetStream server with opts' authentication and TLS
// settings on a free loopback port.
func startNATS(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	opts.Host, opts.Port = "127.0.0.1", -1
	opts.JetStream, opts.StoreDir = true, t.TempDir()
	opts.NoLog, opts.NoSigs = os.Getenv("NATS_TEST_LOG") == "", true
	opts.Debug = !opts.NoLog
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	if !opts.NoLog {
		srv.ConfigureLogger()
	}
	srv.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	return srv
}

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func hostPort(srv *server.Server) string { return srv.Addr().String() }

// pki is a CA with a server certificate for 127.0.0.1 and a client
// certificate, as PEM files.
type pki struct {
	ca         string
	serverCert tls.Certificate
	clientCAs  *x509.CertPool
	clientCert string
	clientKey  string
}

func newPKI(t *testing.T) pki {
	t.Helper()
	caKey, caDER := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "test CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}, nil, nil)
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, srvDER := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "nats"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames: []string{"localhost"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}, caCert, caKey)
	cliKey, cliDER := newCert(t, &x509.Certificate{
		Subject: pkix.Name{CommonName: "worker"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		KeyUsage: x509.KeyUsageDigitalSignature,
	}, caCert, caKey)
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	return pki{
		ca:         writeFile(t, "ca.pem", pemBlock("CERTIFICATE", caDER)),
		serverCert: tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey},
		clientCAs:  pool,
		clientCert: writeFile(t, "client.pem", pemBlock("CERTIFICATE", cliDER)),
		clientKey:  writeFile(t, "client-key.pem", pemKey(t, cliKey)),
	}
}

var serial int64

func newCert(t *testing.T, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial++
	tmpl.SerialNumber = big.NewInt(serial)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	return key, der
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func pemKey(t *testing.T, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pemBlock("PRIVATE KEY", der)
}

// operator is a NATS operator with one account that may use JetStream,
// for a server in operator mode with a memory resolver.
type operator struct {
	claims  *jwt.OperatorClaims
	account nkeys.KeyPair
	jwts    map[string]string // account public key to JWT, the system account's too
}

func newOperator(t *testing.T) operator {
	t.Helper()
	okp, _ := nkeys.CreateOperator()
	opub, _ := okp.PublicKey()
	o := operator{jwts: map[string]string{}}
	account := func(jetStream bool) (nkeys.KeyPair, string) {
		akp, _ := nkeys.CreateAccount()
		apub, _ := akp.PublicKey()
		ac := jwt.NewAccountClaims(apub)
		if jetStream {
			ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
		}
		ajwt, err := ac.Encode(okp)
		if err != nil {
			t.Fatal(err)
		}
		o.jwts[apub] = ajwt
		return akp, apub
	}
	// JetStream in operator mode needs a system account.
	_, sysPub := account(false)
	o.account, _ = account(true)
	oc := jwt.NewOperatorClaims(opub)
	oc.SystemAccount = sysPub
	ojwt, err := oc.Encode(okp)
	if err != nil {
		t.Fatal(err)
	}
	if o.claims, err = jwt.DecodeOperatorClaims(ojwt); err != nil {
		t.Fatal(err)
	}
	return o
}

// creds returns a .creds file of a new user of account.
func creds(t *testing.T, account nkeys.KeyPair, expires time.Time) string {
	t.Helper()
	ukp, _ := nkeys.CreateUser()
	upub, _ := ukp.PublicKey()
	uc := jwt.NewUserClaims(upub)
	if !expires.IsZero() {
		uc.Expires = expires.Unix()
	}
	ujwt, err := uc.Encode(account)
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := ukp.Seed()
	b, err := jwt.FormatUserConfig(ujwt, seed)
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "user.creds", b)
}

func (o operator) serverOptions(t *testing.T) *server.Options {
	t.Helper()
	res := &server.MemAccResolver{}
	for pub, claim := range o.jwts {
		if err := res.Store(pub, claim); err != nil {
			t.Fatal(err)
		}
	}
	return &server.Options{TrustedOperators: []*jwt.OperatorClaims{o.claims}, AccountResolver: res,
		SystemAccount: o.claims.SystemAccount}
}

func TestConnectAuthentication(t *testing.T) {
	const password = "pw-Secret-42"
	const token = "tok-Secret-42"
	pwFile := writeFile(t, "password", []byte(password+"\n"))
	wrongPw := writeFile(t, "wrong-password", []byte("wrong-Secret-1"))
	tokenFile := writeFile(t, "token", []byte(token+"\n"))
	wrongToken := writeFile(t, "wrong-token", []byte("wrong-Secret-2"))

	ukp, _ := nkeys.CreateUser()
	upub, _ := ukp.PublicKey()
	useed, _ := ukp.Seed()
	seedFile := writeFile(t, "user.nk", useed)
	otherKP, _ := nkeys.CreateUser()
	otherPub, _ := otherKP.PublicKey()
	otherSeed, _ := otherKP.Seed()
	otherSeedFile := writeFile(t, "other.nk", otherSeed)

	op := newOperator(t)
	strangerAcc, _ := nkeys.CreateAccount()
	p, stranger := newPKI(t), newPKI(t)

	type attempt struct {
		name string
		auth NATSAuth
		url  func(hostport string) string // default nats://hostport
		want []string                     // substrings of the error; none: success
	}
	tests := []struct {
		name     string
		opts     func() *server.Options
		attempts []attempt
	}{
		{"user and password", func() *server.Options {
			return &server.Options{Users: []*server.User{{Username: "worker", Password: password}}}
		}, []attempt{
			{"password file", NATSAuth{User: "worker", PasswordFile: pwFile}, nil, nil},
			{"password from the environment", NATSAuth{User: "worker", Password: password}, nil, nil},
			{"in the URL", NATSAuth{}, func(hp string) string { return "nats://worker:" + password + "@" + hp }, nil},
			{"none", NATSAuth{}, nil, []string{"nats: authorization violation", "the server wants credentials", "--nats-user"}},
			{"wrong password", NATSAuth{User: "worker", PasswordFile: wrongPw}, nil,
				[]string{"nats: authorization violation", `check --nats-user "worker"`, "--nats-password-file"}},
			{"wrong password in the URL", NATSAuth{}, func(hp string) string { return "nats://worker:wrong-Secret-3@" + hp },
				[]string{"nats://REDACTED@127.0.0.1", "authorization violation", "check the credentials in --nats-url"}},
		}},
		{"token", func() *server.Options { return &server.Options{Authorization: token} }, []attempt{
			{"token file", NATSAuth{TokenFile: tokenFile}, nil, nil},
			{"token from the environment", NATSAuth{Token: token}, nil, nil},
			{"none", NATSAuth{}, nil, []string{"authorization violation", "the server wants credentials"}},
			{"wrong token", NATSAuth{TokenFile: wrongToken}, nil, []string{"authorization violation", "check the token"}},
		}},
		{"nkey", func() *server.Options { return &server.Options{Nkeys: []*server.NkeyUser{{Nkey: upub}}} }, []attempt{
			{"seed file", NATSAuth{NKeySeedFile: seedFile}, nil, nil},
			{"none", NATSAuth{}, nil, []string{"authorization violation", "the server wants credentials"}},
			{"unknown nkey", NATSAuth{NKeySeedFile: otherSeedFile}, nil,
				[]string{"authorization violation", "does not accept the nkey " + otherPub, otherSeedFile}},
		}},
		{"creds", func() *server.Options { return op.serverOptions(t) }, []attempt{
			{"creds file", NATSAuth{CredsFile: creds(t, op.account, time.Time{})}, nil, nil},
			{"none", NATSAuth{}, nil, []string{"authorization violation", "the server wants credentials"}},
			{"unknown account", NATSAuth{CredsFile: creds(t, strangerAcc, time.Time{})}, nil,
				[]string{"authorization violation", "check --nats-creds"}},
		}},
		{"TLS with client certificates", func() *server.Options {
			return &server.Options{TLS: true, TLSVerify: true, TLSTimeout: 5, TLSConfig: &tls.Config{
				Certificates: []tls.Certificate{p.serverCert}, ClientCAs: p.clientCAs,
				ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12,
			}}
		}, []attempt{
			{"tls:// URL", NATSAuth{TLSCA: p.ca, TLSCert: p.clientCert, TLSKey: p.clientKey},
				func(hp string) string { return "tls://" + hp }, nil},
			{"nats:// URL", NATSAuth{TLSCA: p.ca, TLSCert: p.clientCert, TLSKey: p.clientKey}, nil, nil},
			{"no client certificate", NATSAuth{TLSCA: p.ca}, func(hp string) string { return "tls://" + hp },
				[]string{"--nats-tls-cert"}},
			{"client certificate of another CA", NATSAuth{TLSCA: p.ca, TLSCert: stranger.clientCert, TLSKey: stranger.clientKey},
				func(hp string) string { return "tls://" + hp }, []string{"--nats-tls-cert"}},
			{"unknown CA", NATSAuth{TLSCert: p.clientCert, TLSKey: p.clientKey}, func(hp string) string { return "tls://" + hp },
				[]string{"not signed by a CA this host trusts", "--nats-tls-ca"}},
			{"no TLS flags", NATSAuth{}, nil, []string{"not signed by a CA this host trusts", "--nats-tls-ca"}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startNATS(t, tt.opts())
			for _, a := range tt.attempts {
				t.Run(a.name, func(t *testing.T) {
					url := "nats://" + hostPort(srv)
					if a.url != nil {
						url = a.url(hostPort(srv))
					}
					nc, js, err := connectNATS(url, a.auth, natsClient{Name: "test"})
					if len(a.want) == 0 {
						if err != nil {
							t.Fatal(err)
						}
						defer nc.Close()
						ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
						defer cancel()
						if _, err := js.AccountInfo(ctx); err != nil {
							t.Fatalf("jetstream over the connection: %v", err)
						}
						return
					}
					if err == nil {
						nc.Close()
						t.Fatal("connected")
					}
					t.Log(err)
					for _, w := range a.want {
						if !strings.Contains(err.Error(), w) {
							t.Errorf("error %q does not say %q", err, w)
						}
					}
					if strings.Contains(err.Error(), "Secret") {
						t.Errorf("error %q shows a secret", err)
					}
				})
			}
		})
	}
}

func TestNATSAuthValidate(t *testing.T) {
	op := newOperator(t)
	p := newPKI(t)
	pw := writeFile(t, "pw", []byte("pw-Secret"))
	garbage := writeFile(t, "garbage", []byte("not-a-Secret-at-all"))
	empty := writeFile(t, "empty", []byte("\n"))
	missing := filepath.Join(t.TempDir(), "missing")
	akp, _ := nkeys.CreateAccount()
	aseed, _ := akp.Seed()
	accountSeed := writeFile(t, "account.nk", aseed)
	good := creds(t, op.account, time.Time{})
	expired := creds(t, op.account, time.Now().Add(-time.Minute))

	tests := []struct {
		name string
		auth NATSAuth
		url  string
		want []string // nil: valid
	}{
		{"nothing", NATSAuth{}, "nats://h:4222", nil},
		{"user", NATSAuth{User: "w", PasswordFile: pw}, "nats://h:4222", nil},
		{"creds", NATSAuth{CredsFile: good}, "nats://h:4222", nil},
		{"TLS", NATSAuth{TLSCA: p.ca, TLSCert: p.clientCert, TLSKey: p.clientKey}, "tls://h:4222", nil},
		{"URL credentials", NATSAuth{}, "nats://u:Secret@h:4222", nil},
		{"two methods", NATSAuth{User: "w", PasswordFile: pw, CredsFile: good}, "nats://h:4222",
			[]string{"--nats-user and --nats-creds given at once"}},
		{"URL credentials and a token", NATSAuth{Token: "tok-Secret"}, "nats://h:4222,nats://u:Secret@h2:4222",
			[]string{"--nats-token-file/STRETCHY_NATS_TOKEN and credentials in --nats-url given at once"}},
		{"user without password", NATSAuth{User: "w"}, "", []string{`--nats-user "w" needs a password`, "STRETCHY_NATS_PASSWORD"}},
		{"password without user", NATSAuth{Password: "pw-Secret"}, "", []string{"needs --nats-user"}},
		{"password twice", NATSAuth{User: "w", Password: "pw-Secret", PasswordFile: pw}, "", []string{"not both"}},
		{"token twice", NATSAuth{Token: "tok-Secret", TokenFile: pw}, "", []string{"not both"}},
		{"unreadable password file", NATSAuth{User: "w", PasswordFile: missing}, "",
			[]string{"--nats-password-file: open " + missing}},
		{"empty token file", NATSAuth{TokenFile: empty}, "", []string{"--nats-token-file " + empty + ": the file is empty"}},
		{"nkey seed garbage", NATSAuth{NKeySeedFile: garbage}, "", []string{"--nats-nkey-seed " + garbage + ": no user nkey seed"}},
		{"account seed as nkey", NATSAuth{NKeySeedFile: accountSeed}, "", []string{"--nats-nkey-seed " + accountSeed + ": no user nkey seed"}},
		{"missing nkey seed", NATSAuth{NKeySeedFile: missing}, "", []string{"--nats-nkey-seed: open " + missing}},
		{"creds garbage", NATSAuth{CredsFile: garbage}, "", []string{"--nats-creds " + garbage + ": no valid user JWT"}},
		{"creds expired", NATSAuth{CredsFile: expired}, "", []string{"--nats-creds " + expired + ": the user JWT expired at"}},
		{"cert without key", NATSAuth{TLSCert: p.clientCert}, "", []string{"--nats-tls-cert " + p.clientCert + " needs --nats-tls-key"}},
		{"key without cert", NATSAuth{TLSKey: p.clientKey}, "", []string{"--nats-tls-key " + p.clientKey + " needs --nats-tls-cert"}},
		{"CA not PEM", NATSAuth{TLSCA: garbage}, "", []string{"--nats-tls-ca " + garbage + ": no PEM certificate found"}},
		{"key does not match", NATSAuth{TLSCert: p.clientCert, TLSKey: writeFile(t, "k.pem", pemKey(t, mustKey(t)))}, "",
			[]string{"--nats-tls-cert " + p.clientCert + ", --nats-tls-key", "private key does not match"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.auth.Validate(tt.url)
			if tt.want == nil {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("valid")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), "Secret") {
				t.Errorf("error %q shows a secret", err)
			}
		})
	}
}

func mustKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestNATSFlags checks the flags and variables a user sets end up in
// NATSAuth, that a password is taken from the environment only, and that
// "worker run" refuses credentials for its embedded server.
func TestNATSFlags(t *testing.T) {
	t.Setenv("STRETCHY_NATS_PASSWORD", "pw-Secret")
	t.Setenv("STRETCHY_NATS_TLS_CA", "/etc/ca.pem")
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	var a NATSAuth
	a.register(fs)
	if err := fs.Parse([]string{"--nats-user", "w", "--nats-creds", "/c.creds", "--nats-tls-cert", "/crt", "--nats-tls-key", "/key",
		"--nats-nkey-seed", "/nk", "--nats-token-file", "/tok", "--nats-password-file", "/pw"}); err != nil {
		t.Fatal(err)
	}
	want := NATSAuth{User: "w", Password: "pw-Secret", PasswordFile: "/pw", TokenFile: "/tok", NKeySeedFile: "/nk",
		CredsFile: "/c.creds", TLSCA: "/etc/ca.pem", TLSCert: "/crt", TLSKey: "/key"}
	if a != want {
		t.Fatalf("got %#v, want %#v", a, want)
	}
	if fs.Lookup("nats-password") != nil || fs.Lookup("nats-token") != nil {
		t.Fatal("a secret can be given as a flag value")
	}

	var cfg Config
	fs = flag.NewFlagSet("run", flag.ContinueOnError)
	cfg.register(fs)
	if err := fs.Parse([]string{"--nats-user", "w"}); err != nil {
		t.Fatal(err)
	}
	err := cfg.Validate()
	msg := "--nats-user, STRETCHY_NATS_PASSWORD, --nats-tls-ca: only for a NATS server given with --nats-url; " +
		"without one, the worker starts its embedded server, which has no TLS and makes its own credentials, in /var/lib/stretchy-worker/nats/user.nk"
	if err == nil || !strings.Contains(err.Error(), msg) {
		t.Fatalf("embedded server with credentials: %v, want %q", err, msg)
	}
}

func TestSecretsAreNotPrinted(t *testing.T) {
	a := NATSAuth{User: "w", Password: "pw-Secret", Token: "tok-Secret"}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("x", "auth", a, "password", a.Password)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("x", "auth", a, "password", a.Password)
	fmt.Fprintf(&buf, "%v %+v %#v %s", a, a, a, a.Token)
	if strings.Contains(buf.String(), "Secret") {
		t.Fatalf("a secret was printed: %s", buf.String())
	}
	if !strings.Contains(buf.String(), "REDACTED") {
		t.Fatalf("no REDACTED in %s", buf.String())
	}
}

// permServer has an unrestricted user "admin" and one user per entry of
// users, holding the publish and subscribe allow lists given, all with the
// password in the file it returns.
func permServer(t *testing.T, users map[string][2][]string) (*server.Server, string) {
	t.Helper()
	const password = "pw"
	list := []*server.User{{Username: "admin", Password: password}}
	for name, perms := range users {
		list = append(list, &server.User{Username: name, Password: password, Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: perms[0]},
			Subscribe: &server.SubjectPermission{Allow: perms[1]},
			// A worker answers control requests (docs/security.md 2.1).
			Response: &server.ResponsePermission{MaxMsgs: 1, Expires: 3 * time.Minute},
		}})
	}
	return startNATS(t, &server.Options{Users: list}), writeFile(t, "password", []byte(password))
}

func dropSubject(list []string, subject string) []string {
	return slices.DeleteFunc(slices.Clone(list), func(s string) bool { return s == subject })
}

// TestPermissionViolationNamesSubject runs the worker's first steps as
// users lacking one permission each: the error names the subject at once
// instead of timing out.
func TestPermissionViolationNamesSubject(t *testing.T) {
	wpub, wsub := bus.WorkerPermissions("h1")
	update := "$JS.API.STREAM.UPDATE." + messages.RequestsStream
	srv, pwFile := permServer(t, map[string][2][]string{
		"worker":    {wpub, wsub},
		"no-events": {dropSubject(wpub, messages.EventFilter("h1", "", "")), wsub},
		"no-update": {dropSubject(wpub, update), wsub},
	})
	url := "nats://" + hostPort(srv)
	type conn struct {
		nc *natsConn
		js jetstream.JetStream
	}
	connect := func(user string) conn {
		nc, js, err := connectNATS(url, NATSAuth{User: user, PasswordFile: pwFile}, natsClient{Name: "test", InboxPrefix: bus.WorkerInbox("h1")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		return conn{nc, js}
	}
	ensure := func(c conn, t bus.Topology) error {
		nc, js := c.nc, c.js
		ctx, stop := nc.failFast(context.Background())
		defer stop()
		// Without failing fast the refused request would wait for this.
		ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		defer cancel()
		_, err := bus.Ensure(ctx, js, t)
		return nc.explain(err)
	}

	if err := ensure(connect("worker"), bus.Topology{Host: "h1"}); err != nil {
		t.Fatalf("worker with its permissions: %v", err)
	}

	// A stream is updated only when its configuration changes.
	start := time.Now()
	err := ensure(connect("no-update"), bus.Topology{Host: "h1", RequestsMaxAge: time.Hour})
	want := `nats: permissions violation: the NATS user may not publish to "` + update + `"`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("ensure without %s: %v", update, err)
	}
	if d := time.Since(start); d > time.Minute {
		t.Fatalf("the refusal took %s to surface, as if it waited for its context", d)
	}

	c := connect("no-events")
	if err := ensure(c, bus.Topology{Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	nc, js := c.nc, c.js
	ctx, stop := nc.failFast(context.Background())
	defer stop()
	ev := messages.Event{V: messages.SchemaVersion, JobID: "j1", Host: "h1", Image: "img", State: messages.StateAccepted,
		Time: time.Now().UTC(), Seq: 1, Attempt: 1}
	err = nc.explain(bus.NewPublisher(js).Publish(ctx, ev, "j1:1"))
	want = `may not publish to "stretchy.LIBVIRT.evt.h1.j1.accepted"`
	if err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("publishing an event without the permission: %v", err)
	}
}

// TestCommandsWithAuthentication runs "worker submit" and "worker events"
// with their flags as an orchestrator with its permissions, and as one
// lacking one.
func TestCommandsWithAuthentication(t *testing.T) {
	// No worker's embedded server here: its credentials are not found.
	noEmbedded := t.TempDir()
	t.Setenv("STRETCHY_NATS_DATA_DIR", noEmbedded)
	opub, osub := client.OrchestratorPermissions()
	srv, pwFile := permServer(t, map[string][2][]string{
		"orchestrator": {opub, osub},
		"no-requests":  {dropSubject(opub, messages.RequestSubjects), osub},
		"no-reading":   {dropSubject(opub, "$JS.API.CONSUMER.CREATE."+messages.EventsStream+".*."+messages.EventSubjects), osub},
	})
	url := "nats://" + hostPort(srv)
	admin, js, err := connectNATS(url, NATSAuth{User: "admin", PasswordFile: pwFile}, natsClient{Name: "admin"})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := bus.Ensure(ctx, js, bus.Topology{Host: "h1"}); err != nil {
		t.Fatal(err)
	}
	as := func(user string, args ...string) []string {
		return append(args, "--nats-url", url, "--nats-user", user, "--nats-password-file", pwFile)
	}

	if err := submitCommand(ctx, as("orchestrator", "provision", "--job", "j1", "--image", "img")); err != nil {
		t.Fatalf("submit: %v", err)
	}
	if err := submitCommand(ctx, as("orchestrator", "teardown", "--job", "j1", "--host", "h1")); err != nil {
		t.Fatalf("submit teardown: %v", err)
	}
	if err := eventsCommand(ctx, as("orchestrator", "--job", "j1")); err != nil {
		t.Fatalf("events: %v", err)
	}

	err = submitCommand(ctx, as("no-requests", "provision", "--job", "j2", "--image", "img"))
	if err == nil || !strings.Contains(err.Error(), `may not publish to "stretchy.LIBVIRT.req.provision"`) {
		t.Fatalf("submit without the permission: %v", err)
	}
	err = eventsCommand(ctx, as("no-reading", "--job", "j1"))
	if err == nil || !strings.Contains(err.Error(), `may not publish to "$JS.API.CONSUMER.CREATE.STRETCHY_LIBVIRT_EVENTS.`) {
		t.Fatalf("events without the permission: %v", err)
	}
	err = submitCommand(ctx, []string{"provision", "--job", "j3", "--image", "img", "--nats-url", url})
	if err == nil || !strings.Contains(err.Error(), "authorization violation: the server wants credentials") ||
		!strings.Contains(err.Error(), "there are none in "+noEmbedded+"/user.nk") {
		t.Fatalf("submit without credentials: %v", err)
	}
}

// TestWorkerPermissionsCoverAdvisories ties the worker's permissions to the
// advisory subject internal/worker subscribes to, which internal/bus
// cannot import.
func TestWorkerPermissionsCoverAdvisories(t *testing.T) {
	_, sub := bus.WorkerPermissions("h1")
	if !slices.Contains(sub, worker.MaxDeliveriesSubject) {
		t.Fatalf("the worker may subscribe to %q, not to %s", sub, worker.MaxDeliveriesSubject)
	}
}

// TestWorkerConnectsWithoutEcho: worker run's connection does not get its
// own publishes back on its subscriptions, while another client's reach it.
func TestWorkerConnectsWithoutEcho(t *testing.T) {
	srv := startNATS(t, &server.Options{})
	nc, _, err := connectNATS(srv.ClientURL(), NATSAuth{}, workerClient("h1", bus.WorkerInbox("h1"), slog.New(slog.DiscardHandler)))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	other, _, err := connectNATS(srv.ClientURL(), NATSAuth{}, natsClient{Name: "other"})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	sub, err := nc.SubscribeSync("stretchy.LIBVIRT.req.provision")
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("stretchy.LIBVIRT.req.provision", []byte("own")); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	// The server has the worker's own message before the other's: an echo
	// would arrive first.
	if err := other.Publish("stretchy.LIBVIRT.req.provision", []byte("other")); err != nil {
		t.Fatal(err)
	}
	if err := other.Flush(); err != nil {
		t.Fatal(err)
	}
	msg, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if string(msg.Data) != "other" {
		t.Fatalf("the worker's connection got %q first, its own publish", msg.Data)
	}
}

// TestEmbeddedCredentials: a command given no credentials uses those of
// the embedded server in --nats-data-dir for servers on loopback only,
// and says where it looked when they are missing.
func TestEmbeddedCredentials(t *testing.T) {
	dir := t.TempDir()
	creds, err := embedded.EnsureCredentials(dir)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := embedded.Start(embedded.Options{StoreDir: t.TempDir(), Port: -1, NKey: creds.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	pw := writeFile(t, "pw", []byte("pw"))
	p := newPKI(t)
	t.Run("when they apply", func(t *testing.T) {
		for _, tt := range []struct {
			name string
			auth NATSAuth
			url  string
			want bool
		}{
			{"127.0.0.1", NATSAuth{EmbeddedDir: dir}, "nats://127.0.0.1:4222", true},
			{"localhost without a scheme", NATSAuth{EmbeddedDir: dir}, "localhost:4222", true},
			{"::1", NATSAuth{EmbeddedDir: dir}, "nats://[::1]:4222", true},
			{"every URL on loopback", NATSAuth{EmbeddedDir: dir}, "nats://127.0.0.1:4222, nats://127.0.0.2:4223", true},
			{"a remote server", NATSAuth{EmbeddedDir: dir}, "nats://nats1.example.org:4222", false},
			{"a remote server among them", NATSAuth{EmbeddedDir: dir}, "nats://127.0.0.1:4222,nats://10.0.2.2:4222", false},
			{"credentials in the URL", NATSAuth{EmbeddedDir: dir}, "nats://u:p@127.0.0.1:4222", false},
			{"a user", NATSAuth{EmbeddedDir: dir, User: "w", PasswordFile: pw}, "nats://127.0.0.1:4222", false},
			{"a token", NATSAuth{EmbeddedDir: dir, Token: "t"}, "nats://127.0.0.1:4222", false},
			{"TLS", NATSAuth{EmbeddedDir: dir, TLSCA: p.ca}, "tls://127.0.0.1:4222", false},
			{"no data directory", NATSAuth{}, "nats://127.0.0.1:4222", false},
		} {
			t.Run(tt.name, func(t *testing.T) {
				if got := tt.auth.embedded(tt.url).applies; got != tt.want {
					t.Fatalf("the embedded server's credentials apply: %v, want %v", got, tt.want)
				}
				if got := tt.auth.method(tt.url) == authEmbedded; got != tt.want {
					t.Fatalf("method %q", tt.auth.method(tt.url))
				}
			})
		}
	})

	url := srv.ClientURL()
	for _, tt := range []struct {
		name string
		auth NATSAuth
		says string // "": connects
	}{
		{"the worker's data directory", NATSAuth{EmbeddedDir: dir}, ""},
		{"the file as --nats-nkey-seed", NATSAuth{NKeySeedFile: embedded.CredentialsPath(dir)}, ""},
		{"another data directory", NATSAuth{EmbeddedDir: t.TempDir()}, "there are none in "},
		{"another server's credentials", NATSAuth{EmbeddedDir: func() string {
			other := t.TempDir()
			if _, err := embedded.EnsureCredentials(other); err != nil {
				t.Fatal(err)
			}
			return other
		}()}, "the server refused the embedded server's credentials"},
		{"a token instead", NATSAuth{EmbeddedDir: dir, Token: "t"}, "check the token"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			nc, _, err := connectNATS(url, tt.auth, natsClient{Name: "test"})
			if tt.says == "" {
				if err != nil {
					t.Fatal(err)
				}
				nc.Close()
				return
			}
			if err == nil {
				nc.Close()
				t.Fatal("connected")
			}
			if !errors.Is(err, nats.ErrAuthorization) || !strings.Contains(err.Error(), tt.says) {
				t.Fatalf("error %q, want an authorization violation saying %q", err, tt.says)
			}
		})
	}
}

// TestClientDefaultsMatchRun: without settings, the other commands look
// for the server where worker run starts its embedded one, and with
// STRETCHY_NATS_PORT and STRETCHY_NATS_DATA_DIR where those put it.
func TestClientDefaultsMatchRun(t *testing.T) {
	for _, tt := range []struct {
		name     string
		env      map[string]string
		url, dir string
	}{
		{"defaults", nil, "nats://127.0.0.1:4222", "/var/lib/stretchy-worker/nats"},
		{"the environment of worker run", map[string]string{"STRETCHY_NATS_PORT": "14222", "STRETCHY_NATS_DATA_DIR": "/srv/nats"},
			"nats://127.0.0.1:14222", "/srv/nats"},
		{"a NATS URL", map[string]string{"STRETCHY_NATS_URL": "nats://nats1:4222", "STRETCHY_NATS_PORT": "14222"}, "nats://nats1:4222", "/var/lib/stretchy-worker/nats"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clearEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			cfg, _, err := loadConfig("worker run", nil)
			if err != nil {
				t.Fatal(err)
			}
			var nf natsFlags
			nf.register(flag.NewFlagSet("client", flag.ContinueOnError), operatorRole)
			if nf.URL != tt.url || nf.Auth.EmbeddedDir != tt.dir {
				t.Fatalf("client: --nats-url %q, --nats-data-dir %q; want %q, %q", nf.URL, nf.Auth.EmbeddedDir, tt.url, tt.dir)
			}
			runURL := cfg.NATSURL
			if runURL == "" {
				runURL = "nats://127.0.0.1:" + strconv.Itoa(cfg.NATSPort)
			}
			if cfg.NATSDataDir != tt.dir || runURL != tt.url {
				t.Fatalf("worker run: --nats-data-dir %q, server %q; the client's %q, %q", cfg.NATSDataDir, runURL, tt.dir, tt.url)
			}
		})
	}
}
