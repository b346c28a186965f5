package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchy-ci/libvirt-worker/pkg/messages"
	"github.com/stretchy-ci/libvirt-worker/pkg/qga"
)

// otherUserView is run as root in the guest while the GitHub stub sleeps:
// it has the second user, other, try to read each file the runner wrote
// about itself and list the runner's directory, checks that su to other
// works at all, and shows the owner and mode of what the runner wrote.
const otherUserView = `d=/home/stretchy/actions-runner
as_other() { su -s /bin/sh other -c "$1" >/dev/null 2>&1; }
echo "other is $(su -s /bin/sh other -c 'id -u')"
as_other "cat /etc/passwd" && echo "other reads /etc/passwd"
for f in .runner .credentials .credentials_rsaparams; do
  if as_other "cat $d/$f"; then echo "other reads $f"; else echo "other cannot read $f"; fi
done
if as_other "ls $d"; then echo "other lists $d"; else echo "other cannot list $d"; fi
cd "$d" && stat -c '%a %U %n' . .runner .credentials .credentials_rsaparams _work/build.txt
`

// TestGitHubRunnerFilesArePrivate runs a GitHub job whose stub, like the
// real runner given a JIT configuration, writes .runner, .credentials and
// .credentials_rsaparams into its directory with the umask it inherited,
// and a build file below _work. While it runs, another user of the guest
// must not be able to read any of them, and the build file must still
// have been created with umask 022.
func TestGitHubRunnerFilesArePrivate(t *testing.T) {
	l := dialLibvirt(t)
	_, js := startNATS(t)
	events := followEvents(t, js)
	startWorker(t, js, workerOptions{Parallelism: 3, MaxVMs: 4})
	agent := qga.New(l, qga.Options{})

	job := uniqueJob(t, "gh-private")
	req := provisionRequest(job)
	req.Runner = messages.Runner{Kind: messages.RunnerGitHub, GitHub: &messages.GitHubRunner{JITConfig: "PLANTED-" + job}}
	if _, err := submitReq(context.Background(), js, req, ""); err != nil {
		t.Fatal(err)
	}
	events.waitState(t, job, messages.StateRunnerStarted, bootWait)
	domain := messages.DomainName(job)
	// The stub writes its report after the runner's files, then sleeps 5 s.
	readGuestFile(t, agent, domain, "/tmp/runner-report-actions-runner.txt", 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	st, err := agent.Run(ctx, domain, qga.ExecRequest{Path: "/bin/sh", Args: []string{"-c", otherUserView}, Capture: true})
	cancel()
	if err != nil {
		t.Fatalf("look at the runner's files as other: %v\n%s", err, st.Stdout)
	}
	got := string(st.Stdout)
	t.Logf("in the guest:\n%s", got)
	want := `other is 1001
other reads /etc/passwd
other cannot read .runner
other cannot read .credentials
other cannot read .credentials_rsaparams
other cannot list /home/stretchy/actions-runner
700 stretchy .
644 stretchy .runner
644 stretchy .credentials
644 stretchy .credentials_rsaparams
644 stretchy _work/build.txt
`
	if got != want {
		t.Errorf("what other can see of the runner's files:\n%s\nwant:\n%s", got, want)
	}
	if strings.Contains(got, "PLANTED-") {
		t.Error("the JIT configuration shows in the output")
	}
	events.waitState(t, job, messages.StateTornDown, time.Minute)
}
