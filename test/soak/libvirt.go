package soak

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/provision"
)

// Libvirtd is a host's own libvirtd, serving libvirt's test driver and
// nothing else, so that the soak can kill it without touching the
// machine's libvirtd that others use. It runs as an unprivileged user
// (nobody, when the soak runs as root) with its own configuration,
// socket, pid file and logs, no TCP, no keepalive (a worker frozen for
// a while keeps its connection, as with a system libvirtd's defaults it
// would for 30 s), and no driver modules (LIBVIRT_DRIVER_DIR points at
// an empty directory): no QEMU, network or storage driver of its own,
// which could otherwise find the system daemon's state.
//
// The host's machines live in test:///default, whose state libvirtd
// shares between all connections while one is open: the soak keeps one
// (the keeper), so a worker killed and started again finds its machines
// as on a real host, and a restart of libvirtd loses them all, with the
// images, which the soak defines again at once, as a host that lost
// everything and was set up again.
type Libvirtd struct {
	Host   string
	Images []string
	dir    string
	socket string
	proc   *proc

	mu     sync.Mutex
	keeper *libvirt.Libvirt
}

// URI is the libvirt URI of the host's test driver.
func (d *Libvirtd) URI() string { return "test:///default?socket=" + d.socket }

// daemonUser returns the uid and gid libvirtd runs as: nobody's when the
// soak is root, else the soak's own.
func daemonUser() (uid, gid int, asOther bool, err error) {
	if os.Geteuid() != 0 {
		return os.Getuid(), os.Getgid(), false, nil
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		return 0, 0, false, fmt.Errorf("libvirtd user: %w", err)
	}
	uid, _ = strconv.Atoi(u.Uid)
	gid, _ = strconv.Atoi(u.Gid)
	return uid, gid, true, nil
}

// StartLibvirtd starts host's libvirtd with its state under dir and
// defines the images in its test driver.
func StartLibvirtd(ctx context.Context, dir, host string, images []string) (*Libvirtd, error) {
	uid, gid, asOther, err := daemonUser()
	if err != nil {
		return nil, err
	}
	for _, sub := range []string{"", "run", "home", "xdg", "drivers"} {
		p := filepath.Join(dir, sub)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, err
		}
		if err := os.Chown(p, uid, gid); err != nil {
			return nil, fmt.Errorf("libvirtd directory: %w", err)
		}
	}
	d := &Libvirtd{Host: host, Images: images, dir: dir, socket: filepath.Join(dir, "run", "libvirt-sock")}
	conf := filepath.Join(dir, "libvirtd.conf")
	logFile := filepath.Join(dir, "libvirtd-internal.log")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`# The soak's libvirtd of host %s: test driver only, no TCP.
listen_tls = 0
listen_tcp = 0
unix_sock_dir = %q
unix_sock_rw_perms = "0777"
auth_unix_rw = "none"
auth_unix_ro = "none"
keepalive_interval = -1
log_outputs = "3:file:%s"
`, host, filepath.Join(dir, "run"), logFile)), 0o644); err != nil {
		return nil, err
	}
	for _, f := range []string{logFile, filepath.Join(dir, "libvirtd.log")} {
		if err := touch(f, uid, gid); err != nil {
			return nil, err
		}
	}
	libvirtdBin, err := exec.LookPath("libvirtd")
	if err != nil {
		if libvirtdBin, err = exec.LookPath("/usr/sbin/libvirtd"); err != nil {
			return nil, fmt.Errorf("libvirtd: %w", err)
		}
	}
	env := []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + filepath.Join(dir, "home"),
		"XDG_RUNTIME_DIR=" + filepath.Join(dir, "xdg"), "LIBVIRT_DRIVER_DIR=" + filepath.Join(dir, "drivers")}
	d.proc = &proc{name: "libvirtd " + host, log: filepath.Join(dir, "libvirtd.log"), command: func() *exec.Cmd {
		args := []string{libvirtdBin, "--config", conf, "--pid-file", filepath.Join(dir, "run", "libvirtd.pid")}
		if asOther {
			// A change of user clears the parent-death signal: setpriv
			// sets it again for libvirtd.
			args = append([]string{"setpriv", "--reuid=" + strconv.Itoa(uid), "--regid=" + strconv.Itoa(gid), "--clear-groups", "--pdeathsig", "KILL"}, args...)
		}
		cmd := exec.Command(args[0], args[1:]...)
		cmd.Env = env
		return cmd
	}}
	if err := d.up(ctx); err != nil {
		d.Stop()
		return nil, err
	}
	return d, nil
}

func touch(path string, uid, gid int) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	f.Close()
	return os.Chown(path, uid, gid)
}

// up starts libvirtd, connects the keeper and defines the images.
func (d *Libvirtd) up(ctx context.Context) error {
	_ = os.Remove(d.socket)
	if err := d.proc.start(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		l, err := provision.Dial(ctx, d.URI())
		if err == nil {
			d.mu.Lock()
			d.keeper = l
			d.mu.Unlock()
			return d.seed()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("libvirtd of %s did not answer: %w", d.Host, err)
		case <-t.C:
		}
	}
}

// Restart kills libvirtd and starts it again: the host loses every
// machine, and its images are defined again.
func (d *Libvirtd) Restart(ctx context.Context, down time.Duration) error {
	d.mu.Lock()
	if d.keeper != nil {
		_ = d.keeper.Disconnect()
		d.keeper = nil
	}
	d.mu.Unlock()
	if err := d.proc.kill(); err != nil {
		return err
	}
	t := time.NewTimer(down)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
	return d.up(context.WithoutCancel(ctx))
}

// Stop ends libvirtd.
func (d *Libvirtd) Stop() {
	d.mu.Lock()
	if d.keeper != nil {
		_ = d.keeper.Disconnect()
		d.keeper = nil
	}
	d.mu.Unlock()
	_ = d.proc.terminate(10 * time.Second)
}

// poolPath is where the test driver's pool of images says it keeps them;
// nothing is written there.
const poolPath = "/soak-pool"

func (d *Libvirtd) seed() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	l := d.keeper
	pool, err := l.StoragePoolDefineXML(fmt.Sprintf(`<pool type='dir'><name>soak</name><target><path>%s</path></target></pool>`, poolPath), 0)
	if err != nil {
		return fmt.Errorf("libvirtd of %s: define the pool: %w", d.Host, err)
	}
	if err := l.StoragePoolCreate(pool, 0); err != nil {
		return fmt.Errorf("libvirtd of %s: start the pool: %w", d.Host, err)
	}
	for i, img := range d.Images {
		vol := fmt.Sprintf(`<volume type='file'><name>%s.qcow2</name><capacity unit='bytes'>67108864</capacity><allocation unit='bytes'>14221312</allocation><target><format type='qcow2'/></target></volume>`, img)
		if _, err := l.StorageVolCreateXML(pool, vol, 0); err != nil {
			return fmt.Errorf("libvirtd of %s: the disk of %s: %w", d.Host, img, err)
		}
		dom := fmt.Sprintf(`<domain type='test'>
  <name>%s</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='%s/%s.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><mac address='52:54:00:5a:00:%02x'/></interface>
  </devices>
</domain>`, img, poolPath, img, i+1)
		if _, err := l.DomainDefineXML(dom); err != nil {
			return fmt.Errorf("libvirtd of %s: define the image %s: %w", d.Host, img, err)
		}
	}
	return nil
}

// conn returns the keeper connection, or an error while libvirtd is down.
func (d *Libvirtd) conn() (*libvirt.Libvirt, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.keeper == nil {
		return nil, errors.New("libvirtd is down")
	}
	return d.keeper, nil
}

// managedDomains lists the stretchy- domains and whether each runs.
func (d *Libvirtd) managedDomains() (map[string]bool, error) {
	l, err := d.conn()
	if err != nil {
		return nil, err
	}
	doms, _, err := l.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, dom := range doms {
		if !strings.HasPrefix(dom.Name, messages.ManagedPrefix) {
			continue
		}
		state, _, err := l.DomainGetState(dom, 0)
		if err != nil {
			continue // gone meanwhile
		}
		out[dom.Name] = libvirt.DomainState(state) == libvirt.DomainRunning
	}
	return out, nil
}

// Domains counts the host's stretchy- domains, or returns -1.
func (d *Libvirtd) Domains() int {
	doms, err := d.managedDomains()
	if err != nil {
		return -1
	}
	return len(doms)
}

// Leftovers lists the host's stretchy- domains and volumes.
func (d *Libvirtd) Leftovers() ([]string, error) {
	doms, err := d.managedDomains()
	if err != nil {
		return nil, err
	}
	var out []string
	for name := range doms {
		out = append(out, "domain "+name)
	}
	l, err := d.conn()
	if err != nil {
		return nil, err
	}
	pools, _, err := l.ConnectListAllStoragePools(1, 0)
	if err != nil {
		return nil, err
	}
	for _, p := range pools {
		vols, _, err := l.StoragePoolListAllVolumes(p, 1, 0)
		if err != nil {
			continue
		}
		for _, v := range vols {
			if strings.HasPrefix(v.Name, messages.ManagedPrefix) {
				out = append(out, "volume "+v.Key)
			}
		}
	}
	return out, nil
}

// StopGuest powers off one running machine of the host, chosen by rng,
// as a guest that shut itself down; it returns its job id, or "" when
// none runs.
func (d *Libvirtd) StopGuest(rng *rand.Rand) (string, error) {
	doms, err := d.managedDomains()
	if err != nil {
		return "", err
	}
	var running []string
	for name, up := range doms {
		if up {
			running = append(running, name)
		}
	}
	if len(running) == 0 {
		return "", nil
	}
	slices.Sort(running)
	name := running[rng.IntN(len(running))]
	l, err := d.conn()
	if err != nil {
		return "", err
	}
	dom, err := l.DomainLookupByName(name)
	if err == nil {
		err = l.DomainDestroy(dom)
	}
	if err != nil {
		return "", fmt.Errorf("stop the guest %s: %w", name, err)
	}
	return strings.TrimPrefix(name, messages.ManagedPrefix), nil
}
