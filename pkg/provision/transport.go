package provision

import (
	"fmt"
	"net"
	"net/url"
	"os/user"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// transport picks the connection for a libvirt URI, as virsh -c does:
//
//   - qemu:///system (no host) and qemu+unix:///system: the local unix
//     socket, LinkOptions.Socket or the URI's socket= parameter;
//   - qemu+tls://host[:port]/system: TLS to libvirtd's port 16514, with the
//     client certificate, key and CA from libvirt's default PKI paths
//     (/etc/pki/libvirt, /etc/pki/CA) or the URI's pkipath= directory
//     (clientcert.pem, clientkey.pem, cacert.pem); no_verify=1 skips
//     checking the server's certificate;
//   - qemu+tcp://host[:port]/system: plain TCP to port 16509, for trusted
//     networks only;
//   - qemu+ssh://[user@]host[:port]/system: SSH with the current user's
//     keys and known_hosts, to libvirtd's socket on the host (socket=).
//
// It returns the dialer and the URI libvirtd is asked to open, which names
// the driver only (qemu:///system): the transport is this end's business.
func transport(uri string, localSocket string, timeout time.Duration) (socket.Dialer, libvirt.ConnectURI, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Scheme == "" {
		return nil, "", fmt.Errorf("libvirt URI %q: not a URI such as qemu:///system", uri)
	}
	driver, tr, _ := strings.Cut(u.Scheme, "+")
	q := u.Query()
	open := libvirt.ConnectURI((&url.URL{Scheme: driver, Path: u.Path}).String())
	if driver == "test" || (tr == "" && u.Host == "") {
		// Local: the daemon gets the URI as it is (test:///... too).
		if s := q.Get("socket"); s != "" {
			localSocket = s
		}
		return &unixDialer{path: localSocket, timeout: timeout}, libvirt.ConnectURI(uri), nil
	}
	host, port := u.Hostname(), u.Port()
	switch tr {
	case "unix":
		if s := q.Get("socket"); s != "" {
			localSocket = s
		}
		return &unixDialer{path: localSocket, timeout: timeout}, open, nil
	case "tls", "":
		var opts []dialers.TLSOption
		if port != "" {
			opts = append(opts, dialers.UseTLSPort(port))
		}
		if p := q.Get("pkipath"); p != "" {
			opts = append(opts, dialers.UsePKIPath(p))
		}
		if q.Get("no_verify") == "1" {
			opts = append(opts, dialers.WithInsecureNoVerify())
		}
		return dialers.NewTLS(host, opts...), open, nil
	case "tcp":
		opts := []dialers.RemoteOption{dialers.WithRemoteTimeout(timeout)}
		if port != "" {
			opts = append(opts, dialers.UsePort(port))
		}
		return dialers.NewRemote(host, opts...), open, nil
	case "ssh":
		me, err := user.Current()
		if err != nil {
			return nil, "", fmt.Errorf("libvirt URI %q: current user for ssh: %w", uri, err)
		}
		opts := []dialers.SSHOption{dialers.WithSystemSSHDefaults(me)}
		if u.User != nil {
			opts = append(opts, dialers.UseSSHUsername(u.User.Username()))
		}
		if port != "" {
			opts = append(opts, dialers.UseSSHPort(port))
		}
		if s := q.Get("socket"); s != "" {
			opts = append(opts, dialers.WithRemoteSocket(s))
		}
		return dialers.NewSSH(host, opts...), open, nil
	}
	return nil, "", fmt.Errorf("libvirt URI %q: transport %q is not supported (use unix, tls, tcp or ssh)", uri, tr)
}

// unixDialer dials a local unix socket.
type unixDialer struct {
	path    string
	timeout time.Duration
}

func (d *unixDialer) Dial() (net.Conn, error) { return net.DialTimeout("unix", d.path, d.timeout) }
