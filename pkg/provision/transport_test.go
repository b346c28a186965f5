package provision

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
)

func TestTransport(t *testing.T) {
	tests := []struct {
		uri     string
		open    libvirt.ConnectURI
		dialer  string // type name of the dialer
		wantErr string
	}{
		{"qemu:///system", "qemu:///system", "*provision.unixDialer", ""},
		{"qemu+unix:///system?socket=/tmp/s", "qemu:///system", "*provision.unixDialer", ""},
		{"test:///tmp/node.xml", "test:///tmp/node.xml", "*provision.unixDialer", ""},
		{"qemu+tls://host.example/system", "qemu:///system", "*dialers.TLS", ""},
		{"qemu://host.example/system", "qemu:///system", "*dialers.TLS", ""},
		{"qemu+tcp://10.1.2.3:1234/system", "qemu:///system", "*dialers.Remote", ""},
		{"qemu+ssh://ci@host.example/system", "qemu:///system", "*dialers.SSH", ""},
		{"qemu+libssh2://host/system", "", "", "not supported"},
		{"not a uri", "", "", "not a URI"},
	}
	for _, tt := range tests {
		t.Run(tt.uri, func(t *testing.T) {
			d, open, err := transport(tt.uri, DefaultSocket, time.Second)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("got %v, want an error with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if open != tt.open {
				t.Errorf("opens %q, want %q", open, tt.open)
			}
			if got := fmt.Sprintf("%T", d); got != tt.dialer {
				t.Errorf("dialer %s, want %s", got, tt.dialer)
			}
		})
	}
}

// pki is a CA with a server and a client certificate, written the way
// libvirt's pkipath= expects them.
type pki struct {
	dir    string
	server tls.Certificate
	pool   *x509.CertPool
}

func newPKI(t *testing.T) pki {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(cn string, usage x509.ExtKeyUsage) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	pemOf := func(typ string, b []byte) []byte { return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}) }
	keyPEM := func(k *ecdsa.PrivateKey) []byte {
		b, _ := x509.MarshalECPrivateKey(k)
		return pemOf("EC PRIVATE KEY", b)
	}
	srvDER, srvKey := issue("127.0.0.1", x509.ExtKeyUsageServerAuth)
	server, err := tls.X509KeyPair(pemOf("CERTIFICATE", srvDER), keyPEM(srvKey))
	if err != nil {
		t.Fatal(err)
	}
	cliDER, cliKey := issue("worker", x509.ExtKeyUsageClientAuth)
	dir := t.TempDir()
	for name, data := range map[string][]byte{
		"cacert.pem": pemOf("CERTIFICATE", caDER), "clientcert.pem": pemOf("CERTIFICATE", cliDER), "clientkey.pem": keyPEM(cliKey),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return pki{dir: dir, server: server, pool: pool}
}

// libvirtFront listens like a remote libvirtd (TLS with client
// certificates, or plain TCP) and forwards to the local daemon's socket, so
// that the worker's remote transports are tested against the real daemon.
func libvirtFront(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				if cfg != nil {
					tc := tls.Server(c, cfg)
					if err := tc.Handshake(); err != nil {
						return
					}
					// libvirtd tells a TLS client its certificate passed.
					if _, err := tc.Write([]byte{1}); err != nil {
						return
					}
					c = tc
				}
				up, err := net.Dial("unix", DefaultSocket)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); _ = up.Close() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return ln.Addr().String()
}

func TestRemoteTransports(t *testing.T) {
	requireLibvirt(t)
	p := newPKI(t)
	tlsAddr := libvirtFront(t, &tls.Config{
		Certificates: []tls.Certificate{p.server}, ClientCAs: p.pool, ClientAuth: tls.RequireAndVerifyClientCert,
	})
	tcpAddr := libvirtFront(t, nil)
	stranger := newPKI(t) // a client certificate from another CA

	tests := []struct {
		name string
		uri  string
		ok   bool
	}{
		{"tls", "qemu+tls://" + tlsAddr + "/system?pkipath=" + p.dir, true},
		{"tls with the PKI of another CA", "qemu+tls://" + tlsAddr + "/system?pkipath=" + stranger.dir, false},
		{"tcp", "qemu+tcp://" + tcpAddr + "/system", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			link := NewLink(tt.uri, LinkOptions{ConnectTimeout: 5 * time.Second})
			defer link.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := link.Connect(ctx)
			if !tt.ok {
				if err == nil {
					t.Fatal("connected with certificates of a CA the other side does not trust")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			machines, err := New(link.Libvirt(), Options{Link: link}).List(ctx)
			if err != nil {
				t.Fatalf("list over %s: %v", tt.name, err)
			}
			t.Logf("%s: %d managed machines listed through %s", tt.name, len(machines), tt.uri)
		})
	}
}
