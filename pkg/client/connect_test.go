package client_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/stretchy-ci/libvirt-worker/pkg/client"
)

func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// newCert makes a certificate of tmpl signed by parent (self-signed when
// nil) and returns its key and PEM.
func newCert(t *testing.T, tmpl, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter = serial, time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return key, cert, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func keyPEM(t *testing.T, key *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func startWith(t *testing.T, opts *server.Options) string {
	t.Helper()
	opts.Host, opts.Port, opts.JetStream, opts.StoreDir, opts.NoLog, opts.NoSigs = "127.0.0.1", -1, true, t.TempDir(), true, true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server not ready")
	}
	return "nats://" + srv.Addr().String()
}

// TestConnectAuthenticates: every way the worker's commands authenticate
// works through Connect's options, and the server's refusal of wrong
// credentials is an authorization error, not ErrUnreachable.
func TestConnectAuthenticates(t *testing.T) {
	ukp, _ := nkeys.CreateUser()
	upub, _ := ukp.PublicKey()
	useed, _ := ukp.Seed()
	seedFile := writeFile(t, "user.nk", useed)
	otherKP, _ := nkeys.CreateUser()
	otherSeed, _ := otherKP.Seed()

	// An operator with a JetStream account, for .creds files.
	okp, _ := nkeys.CreateOperator()
	opub, _ := okp.PublicKey()
	resolver := &server.MemAccResolver{}
	account := func(js bool) (nkeys.KeyPair, string) {
		akp, _ := nkeys.CreateAccount()
		apub, _ := akp.PublicKey()
		ac := jwt.NewAccountClaims(apub)
		if js {
			ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
		}
		ajwt, err := ac.Encode(okp)
		if err != nil {
			t.Fatal(err)
		}
		if err := resolver.Store(apub, ajwt); err != nil {
			t.Fatal(err)
		}
		return akp, apub
	}
	_, sysPub := account(false)
	accKP, _ := account(true)
	oc := jwt.NewOperatorClaims(opub)
	oc.SystemAccount = sysPub
	ojwt, err := oc.Encode(okp)
	if err != nil {
		t.Fatal(err)
	}
	claims, err := jwt.DecodeOperatorClaims(ojwt)
	if err != nil {
		t.Fatal(err)
	}
	credsFile := func(signer nkeys.KeyPair) string {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		ujwt, err := jwt.NewUserClaims(pub).Encode(signer)
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := kp.Seed()
		b, err := jwt.FormatUserConfig(ujwt, seed)
		if err != nil {
			t.Fatal(err)
		}
		return writeFile(t, "user.creds", b)
	}
	stranger, _ := nkeys.CreateAccount()

	caKey, caCert, caPEM := newCert(t, &x509.Certificate{Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}, nil, nil)
	srvKey, _, srvPEM := newCert(t, &x509.Certificate{Subject: pkix.Name{CommonName: "nats"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, KeyUsage: x509.KeyUsageDigitalSignature}, caCert, caKey)
	cliKey, _, cliPEM := newCert(t, &x509.Certificate{Subject: pkix.Name{CommonName: "orchestrator"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}, caCert, caKey)
	srvPair, err := tls.X509KeyPair(srvPEM, keyPEM(t, srvKey))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	caFile, cliFile, cliKeyFile := writeFile(t, "ca.pem", caPEM), writeFile(t, "client.pem", cliPEM), writeFile(t, "client-key.pem", keyPEM(t, cliKey))

	for _, tt := range []struct {
		name   string
		server *server.Options
		good   []client.Option
		bad    []client.Option // refused by the server
	}{
		{"user and password", &server.Options{Username: "o", Password: "pw"},
			[]client.Option{client.WithUserInfo("o", "pw")}, []client.Option{client.WithUserInfo("o", "wrong")}},
		{"token", &server.Options{Authorization: "tok"},
			[]client.Option{client.WithToken("tok")}, []client.Option{client.WithToken("wrong")}},
		{"nkey seed", &server.Options{Nkeys: []*server.NkeyUser{{Nkey: upub}}},
			[]client.Option{client.WithNKeySeedFile(seedFile)}, []client.Option{client.WithNKeySeedFile(writeFile(t, "other.nk", otherSeed))}},
		{"creds", &server.Options{TrustedOperators: []*jwt.OperatorClaims{claims}, AccountResolver: resolver, SystemAccount: sysPub},
			[]client.Option{client.WithCredsFile(credsFile(accKP))}, []client.Option{client.WithCredsFile(credsFile(stranger))}},
		{"TLS with a client certificate", &server.Options{TLS: true, TLSVerify: true, TLSTimeout: 5, TLSConfig: &tls.Config{
			Certificates: []tls.Certificate{srvPair}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}},
			[]client.Option{client.WithTLS(caFile, cliFile, cliKeyFile)}, []client.Option{client.WithTLS(caFile, "", "")}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			url := startWith(t, tt.server)
			c, err := client.Connect(url, tt.good...)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// A JetStream request answered: no worker made the buckets.
			if _, err := c.Hosts(ctx); !errors.Is(err, client.ErrNotSetUp) {
				t.Fatalf("Hosts over the connection: %v, want ErrNotSetUp", err)
			}
			c2, err := client.Connect(url, tt.bad...)
			if err == nil {
				c2.Close()
				t.Fatal("connected with wrong credentials")
			}
			if errors.Is(err, client.ErrUnreachable) && !errors.Is(err, nats.ErrAuthorization) {
				t.Fatalf("wrong credentials: %v, taken for an unreachable server", err)
			}
			var ce *client.ConnectError
			if !errors.As(err, &ce) {
				t.Fatalf("wrong credentials: %v, want a *ConnectError", err)
			}
		})
	}
	if _, err := client.Connect("nats://127.0.0.1:1", client.WithToken("a"), client.WithUserInfo("u", "p")); err == nil {
		t.Fatal("connected with two authentication methods")
	}
}
