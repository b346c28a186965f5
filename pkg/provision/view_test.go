package provision

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/sourcegraph/conc"
	"libvirt.org/go/libvirtxml"
)

// eventsOn gives Watch the events of the test's own connection: a test
// driver's state is private to its connection, so the events of another
// one would be about another host. Disconnect ends the subscriptions only.
type eventsOn struct {
	l      *libvirt.Libvirt
	ctx    context.Context
	cancel context.CancelFunc
}

func (e *eventsOn) SubscribeEvents(_ context.Context, id libvirt.DomainEventID, dom libvirt.OptDomain) (<-chan any, error) {
	return e.l.SubscribeEvents(e.ctx, id, dom)
}

func (e *eventsOn) Disconnect() error {
	e.cancel()
	return nil
}

// watch runs p.Watch on l's events until t ends and returns once the
// view is current.
func watch(t *testing.T, p *Provisioner, l *libvirt.Libvirt, events bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	checked := make(chan error, 16)
	o := WatchOptions{OnCheck: func(err error) {
		select {
		case checked <- err:
		default:
		}
	}}
	if events {
		o.Events = func(context.Context) (EventConn, error) {
			ectx, ecancel := context.WithCancel(ctx)
			return &eventsOn{l: l, ctx: ectx, cancel: ecancel}, nil
		}
	}
	var wg conc.WaitGroup
	wg.Go(func() { _ = p.Watch(ctx, o) })
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	select {
	case err := <-checked:
		if err != nil {
			t.Fatalf("first full check: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no full check within 10s")
	}
	if !p.view.use() {
		t.Fatal("the view is not current after its first full check")
	}
}

// soon fails t unless cond holds within 5s.
func soon(t *testing.T, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("%s: not within 5s", what)
		case <-tick.C:
		}
	}
}

// defineForeign defines a test domain named name with the given disk
// sources and MAC behind the Provisioner's back.
func defineForeign(t *testing.T, l *libvirt.Libvirt, name, mac string, disks ...string) libvirt.Domain {
	t.Helper()
	var dd []libvirtxml.DomainDisk
	for i, path := range disks {
		dd = append(dd, fileDisk("disk", path, fmt.Sprintf("vd%c", 'a'+i), false))
	}
	def := image(dd)
	def.Type, def.Name, def.UUID, def.GenID, def.SysInfo = "test", name, "", nil, nil
	def.Devices.Interfaces = []libvirtxml.DomainInterface{{
		MAC:    &libvirtxml.DomainInterfaceMAC{Address: mac},
		Source: &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}},
	}}
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := l.DomainDefineXMLFlags(doc, 0)
	if err != nil {
		t.Fatal(err)
	}
	return dom
}

// TestViewSeesDomainsBehindItsBack: domains other programs define, start,
// stop and undefine reach the view through libvirt's events, and their
// MAC addresses are then the ones clones avoid.
func TestViewSeesDomainsBehindItsBack(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	watch(t, p, l, true)
	const mac = "52:54:00:aa:bb:01"
	dom := defineForeign(t, l, "outsider", mac)
	soon(t, "a domain defined behind its back is seen", func() bool { return p.view.macs()[mac] })
	if err := l.DomainCreate(dom); err != nil {
		t.Fatal(err)
	}
	soon(t, "a started domain's live definition is read", func() bool {
		p.view.mu.Lock()
		defer p.view.mu.Unlock()
		return len(p.view.domains["outsider"].facts) == 2
	})
	taken, err := p.hostMACs(t.Context())
	if err != nil || !taken[mac] {
		t.Fatalf("hostMACs = %v, %v; want it to hold %s", taken, err, mac)
	}
	if err := l.DomainDestroy(dom); err != nil {
		t.Fatal(err)
	}
	if err := l.DomainUndefineFlags(dom, 0); err != nil {
		t.Fatal(err)
	}
	soon(t, "a domain undefined behind its back is forgotten", func() bool { return !p.view.macs()[mac] })
}

// TestViewSeesVolumesAtItsChecks: libvirt has no volume events, so a
// volume made or deleted behind the view's back is seen by the next full
// check.
func TestViewSeesVolumesAtItsChecks(t *testing.T) {
	l, dir := testNode(t)
	p := New(l, Options{})
	watch(t, p, l, false)
	pool, err := l.StoragePoolLookupByName("images")
	if err != nil {
		t.Fatal(err)
	}
	vx := libvirtxml.StorageVolume{
		Name: "made-elsewhere.qcow2", Capacity: &libvirtxml.StorageVolumeSize{Value: 1},
		Target:       &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{Path: filepath.Join(dir, "pool", "image.qcow2")},
	}
	doc, _ := vx.Marshal()
	vol, err := l.StorageVolCreateXML(pool, doc, 0)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "pool", "made-elsewhere.qcow2")
	known := func() bool {
		p.view.mu.Lock()
		defer p.view.mu.Unlock()
		_, ok := p.view.volumes[path]
		return ok
	}
	if known() {
		t.Fatal("the view knew of a volume before any check")
	}
	if err := p.checkView(t.Context(), WatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if !known() {
		t.Fatal("a volume made behind the view's back is not seen by a full check")
	}
	img := poolVolume{vol: libvirt.StorageVol{Pool: "images", Name: "image.qcow2"}, path: filepath.Join(dir, "pool", "image.qcow2")}
	if got := p.view.storageUse("", []poolVolume{img}); !got.paths[img.path] {
		t.Error("the new volume's backing store is not in use")
	}
	if err := l.StorageVolDelete(vol, 0); err != nil {
		t.Fatal(err)
	}
	if err := p.checkView(t.Context(), WatchOptions{}); err != nil {
		t.Fatal(err)
	}
	if known() {
		t.Fatal("a volume deleted behind the view's back is still known after a full check")
	}
}

// TestViewCloneAndRemove: with the view current, machines are cloned and
// removed as without it, the view follows them, and Remove still keeps
// what a domain defined, or a volume made, behind its back uses, before
// any full check saw them.
func TestViewCloneAndRemove(t *testing.T) {
	l, dir := testNode(t)
	p := New(l, Options{})
	watch(t, p, l, true)
	ctx := t.Context()
	pool := filepath.Join(dir, "pool")
	poolRef, err := l.StoragePoolLookupByName("images")
	if err != nil {
		t.Fatal(err)
	}

	// Not clone(): these machines' disks stay, as the test says.
	a, err := p.Clone(ctx, testSpec("view-a"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := p.Clone(ctx, testSpec("view-b"))
	if err != nil {
		t.Fatal(err)
	}
	macs := p.view.macs()
	for _, m := range []Machine{a, b} {
		for _, mac := range domainMACs(domainXML(t, l, m.Name)) {
			if !macs[mac] {
				t.Errorf("the view lacks %s's MAC %s", m.Name, mac)
			}
		}
	}
	if orphans := p.view.volumesOf(func(name string) bool { return ownedVolumePath("view-a", name) }); len(orphans) != len(a.Volumes) {
		t.Errorf("the view has %d volumes of view-a, want %d", len(orphans), len(a.Volumes))
	}

	// Behind its back: a domain that uses b's disk, and an overlay on
	// a's disk in no domain.
	defineForeign(t, l, "borrower", "52:54:00:aa:bb:02", b.Volumes[0])
	soon(t, "the borrower is seen", func() bool { return p.view.macs()["52:54:00:aa:bb:02"] })
	overlay := libvirtxml.StorageVolume{
		Name: "overlay.qcow2", Capacity: &libvirtxml.StorageVolumeSize{Value: 1},
		Target:       &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{Path: a.Volumes[0]},
	}
	doc, _ := overlay.Marshal()
	if _, err := l.StorageVolCreateXML(poolRef, doc, 0); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		m    Machine
		user string
	}{
		{a, "volume " + filepath.Join(pool, "overlay.qcow2")},
		{b, "domain borrower"},
	} {
		existed, err := p.Remove(ctx, tc.m.Key)
		if !existed || err == nil || !strings.Contains(err.Error(), tc.user) {
			t.Errorf("Remove(%s) = %v, %v; want the disk kept, used by %s", tc.m.Key, existed, err, tc.user)
		}
		if _, lerr := l.StorageVolLookupByPath(tc.m.Volumes[0]); lerr != nil {
			t.Errorf("%s's disk was deleted: %v", tc.m.Key, lerr)
		}
		if _, ok := domainStates(t, l)[tc.m.Name]; ok {
			t.Errorf("%s is still defined", tc.m.Name)
		}
	}
	p.view.mu.Lock()
	_, aKnown := p.view.domains[a.Name]
	p.view.mu.Unlock()
	if aKnown {
		t.Error("the view still has a removed machine")
	}
	if !p.view.use() {
		t.Error("the view stopped being current")
	}
}

// TestViewNotUsedAfterUnknownOutcome: after a call whose outcome is not
// known, the Provisioner scans until the next full check.
func TestViewNotUsedAfterUnknownOutcome(t *testing.T) {
	v := newHostView()
	v.setCurrent(true)
	p := &Provisioner{view: v}
	p.unsure(fmt.Errorf("define: %w", ErrTimeout))
	if v.use() {
		t.Fatal("the view is used after a call timed out")
	}
	select {
	case <-v.stale:
	default:
		t.Fatal("Watch is not asked to check the view again")
	}
}

// TestHostViewReads: a read of libvirt begun before one of the
// Provisioner's own changes does not undo it, and tombstones go once no
// read needs them.
func TestHostViewReads(t *testing.T) {
	facts := []domainFacts{{name: "d", macs: []string{"52:54:00:00:00:01"}}}
	vol := viewVolume{vol: libvirt.StorageVol{Pool: "p", Name: "v"}, path: "/p/v"}
	for _, tc := range []struct {
		name string
		// own changes the view while the read runs; read applies the
		// read's result; want says whether d (or /p/v) is known after.
		own, read func(v *hostView, n uint64)
		want      bool
	}{
		{"defined while a read found nothing",
			func(v *hostView, _ uint64) { v.putDomain("d", facts) },
			func(v *hostView, n uint64) { v.readDomain(n, "d", nil, false) }, true},
		{"undefined while a read found it",
			func(v *hostView, _ uint64) { v.putDomain("d", facts); v.dropDomain("d") },
			func(v *hostView, n uint64) { v.readDomain(n, "d", facts, true) }, false},
		{"a full check begun before a definition",
			func(v *hostView, _ uint64) { v.putDomain("d", facts) },
			func(v *hostView, n uint64) { v.replace(n, map[string][]domainFacts{}, nil) }, true},
		{"a full check begun before an undefinition",
			func(v *hostView, _ uint64) { v.dropDomain("d") },
			func(v *hostView, n uint64) { v.replace(n, map[string][]domainFacts{"d": facts}, nil) }, false},
		{"nothing changed: the read counts",
			func(*hostView, uint64) {},
			func(v *hostView, n uint64) { v.readDomain(n, "d", facts, true) }, true},
		{"a volume created while a full check ran",
			func(v *hostView, _ uint64) { v.putVolume(vol.vol, vol.path, "") },
			func(v *hostView, n uint64) { v.replace(n, nil, nil) }, true},
		{"a volume deleted while a read found it",
			func(v *hostView, _ uint64) { v.putVolume(vol.vol, vol.path, ""); v.dropVolume(vol.path) },
			func(v *hostView, n uint64) { v.readVolume(n, vol) }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newHostView()
			n := v.begin()
			tc.own(v, n)
			tc.read(v, n)
			v.end(n)
			_, dk := v.domains["d"]
			_, vk := v.volumes[vol.path]
			if got := dk || vk; got != tc.want {
				t.Errorf("known = %v, want %v", got, tc.want)
			}
			if len(v.goneDomains)+len(v.goneVolumes) != 0 {
				t.Errorf("tombstones left after the last read: %v %v", v.goneDomains, v.goneVolumes)
			}
		})
	}
}

// TestSystemViewSeesOtherConnections: on qemu:///system, where every
// connection sees one host, a domain another program defines and
// undefines reaches the view through the events of Watch's own
// connection, as the worker runs it.
func TestSystemViewSeesOtherConnections(t *testing.T) {
	l := dial(t, string(libvirt.QEMUSystem))
	other := dial(t, string(libvirt.QEMUSystem))
	p := New(l, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	checked := make(chan error, 16)
	var wg conc.WaitGroup
	wg.Go(func() {
		_ = p.Watch(ctx, WatchOptions{
			Events: func(ctx context.Context) (EventConn, error) { return Dial(ctx, string(libvirt.QEMUSystem)) },
			OnCheck: func(err error) {
				select {
				case checked <- err:
				default:
				}
			},
		})
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
	})
	if err := <-checked; err != nil {
		t.Fatalf("first full check: %v", err)
	}

	name := "provtest-view-" + strings.TrimPrefix(testJobID(t), "provtest-")
	const mac = "52:54:00:7a:7a:01"
	def := libvirtxml.Domain{
		Type: "qemu", Name: name, Memory: &libvirtxml.DomainMemory{Value: 64, Unit: "MiB"},
		OS: &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Type: "hvm"}},
		Devices: &libvirtxml.DomainDeviceList{Interfaces: []libvirtxml.DomainInterface{{
			MAC:    &libvirtxml.DomainInterfaceMAC{Address: mac},
			Source: &libvirtxml.DomainInterfaceSource{User: &libvirtxml.DomainInterfaceSourceUser{}},
		}}},
	}
	doc, err := def.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	dom, err := other.DomainDefineXMLFlags(doc, 0)
	if err != nil {
		t.Fatal(err)
	}
	undefined := false
	t.Cleanup(func() {
		if !undefined {
			_ = other.DomainUndefineFlags(dom, 0)
		}
	})
	soon(t, "a domain another connection defined is seen", func() bool { return p.view.macs()[mac] })
	if err := other.DomainUndefineFlags(dom, 0); err != nil {
		t.Fatal(err)
	}
	undefined = true
	soon(t, "a domain another connection undefined is forgotten", func() bool { return !p.view.macs()[mac] })
}

// TestViewCloneRetriesOnConflict: a volume named for the job that the view
// does not know (made behind its back before any full check saw it) makes
// libvirt refuse the clone's volume; the clone then checks again and
// succeeds instead of failing on a stale view.
func TestViewCloneRetriesOnConflict(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	watch(t, p, l, false)
	ctx := t.Context()
	first, err := p.Clone(ctx, testSpec("view-conflict"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Remove(ctx, first.Key); err != nil {
		t.Fatal(err)
	}
	// The disk volume again, behind the view's back, as a crashed
	// earlier attempt of the job would leave it.
	pool, err := l.StoragePoolLookupByName("images")
	if err != nil {
		t.Fatal(err)
	}
	name := filepath.Base(first.Volumes[0])
	vx := libvirtxml.StorageVolume{
		Name: name, Capacity: &libvirtxml.StorageVolumeSize{Value: 1},
		Target: &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"}},
	}
	doc, _ := vx.Marshal()
	if _, err := l.StorageVolCreateXML(pool, doc, 0); err != nil {
		t.Fatal(err)
	}
	if len(p.view.volumesOf(func(n string) bool { return n == name })) != 0 {
		t.Fatal("the view knows the volume made behind its back")
	}
	m := clone(t, p, testSpec("view-conflict"))
	if len(m.Volumes) == 0 || m.Volumes[0] != first.Volumes[0] {
		t.Errorf("cloned volumes %v, want %s first", m.Volumes, first.Volumes[0])
	}
	soon(t, "the view is current again", p.view.use)
}

// TestViewCheckReportsSharedMACs: a full check tells of a MAC address
// that a managed domain shares with another, which libvirt does not
// refuse and the view cannot prevent when the other was defined before
// its events arrived; addresses shared by unmanaged domains alone are
// not the worker's to report.
func TestViewCheckReportsSharedMACs(t *testing.T) {
	l, _ := testNode(t)
	p := New(l, Options{})
	m := clone(t, p, testSpec("view-shared"))
	macs := domainMACs(domainXML(t, l, m.Name))
	if len(macs) == 0 {
		t.Fatal("the clone has no MAC address")
	}
	defineForeign(t, l, "twin", macs[0])
	defineForeign(t, l, "other-a", "52:54:00:aa:bb:03")
	defineForeign(t, l, "other-b", "52:54:00:aa:bb:03")
	got := map[string][]string{}
	o := WatchOptions{OnSharedMAC: func(mac string, domains []string) { got[mac] = domains }}
	if err := p.checkView(t.Context(), o); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{macs[0]: {m.Name, "twin"}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("shared MACs reported %v, want %v", got, want)
	}
}
