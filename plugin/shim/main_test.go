package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// agent listens on a socket in dir and answers each connection with answer(request).
func agent(t *testing.T, path string, answer func(net.Conn, []byte)) {
	t.Helper()
	listener, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			request, _ := io.ReadAll(conn)
			answer(conn, request)
			conn.Close()
		}
	}()
}

func TestCallSendsTheRequestAndReturnsTheReply(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	var seen []byte
	agent(t, socket, func(conn net.Conn, request []byte) {
		seen = request
		conn.Write([]byte("0\x00{\"cniVersion\":\"1.0.0\"}"))
	})
	code, out, err := call(socket, []string{"CNI_COMMAND=ADD"}, []byte("{}"), time.Now().Add(replyTimeout))
	if err != nil || code != 0 || string(out) != `{"cniVersion":"1.0.0"}` {
		t.Fatalf("got %d %q %v", code, out, err)
	}
	if string(seen) != "pyabouts/1\nCNI_COMMAND=ADD\x00\x00{}" {
		t.Fatalf("the agent read %q", seen)
	}
}

func TestCallReadsALongReplyThatArrivesInPiecesWhole(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	long := `"` + strings.Repeat("x", 100_000) + `"` // JSON, many times the first read's buffer
	agent(t, socket, func(conn net.Conn, _ []byte) {
		reply := "0\x00" + long
		for len(reply) > 0 {
			piece := 7_000
			if piece > len(reply) {
				piece = len(reply)
			}
			conn.Write([]byte(reply[:piece]))
			reply = reply[piece:]
			time.Sleep(time.Millisecond)
		}
	})
	code, out, err := call(socket, nil, []byte("{}"), time.Now().Add(replyTimeout))
	if err != nil || code != 0 || string(out) != long {
		t.Fatalf("got %d, %d bytes, %v", code, len(out), err)
	}
}

func TestCallPrintsTheAnswerOfAnAgentThatDidNotReadTheRequest(t *testing.T) {
	// A refusal (too large, busy, not root) is answered without reading the request, and the
	// close with the request unread resets the connection: the answer is what counts.
	socket := filepath.Join(t.TempDir(), "agent.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { listener.Close() })
	go func() {
		conn, err := listener.Accept()
		if err != nil {
			return
		}
		conn.Read(make([]byte, 1)) // the request has begun; the rest stays unread
		conn.Write([]byte("1\x00{\"code\":6}"))
		conn.Close()
	}()
	// Small enough to be written whole before the agent closes: the reset then meets the read.
	code, out, err := call(socket, nil, bytes.Repeat([]byte("x"), 1024), time.Now().Add(replyTimeout))
	if err != nil || code != 1 || string(out) != `{"code":6}` {
		t.Fatalf("got %d %q %v", code, out, err)
	}
}

func TestCallTimesOutOnAnAgentThatNeverReads(t *testing.T) {
	defer func(saved time.Duration) { replyTimeout = saved }(replyTimeout)
	replyTimeout = 200 * time.Millisecond
	socket := filepath.Join(t.TempDir(), "agent.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	accepted := make(chan net.Conn, 1)
	go func() {
		if conn, err := listener.Accept(); err == nil {
			accepted <- conn // held open, never read
		}
	}()
	t.Cleanup(func() {
		listener.Close()
		select {
		case conn := <-accepted:
			conn.Close()
		default:
		}
	})
	// Far more than the socket's buffers: the write blocks until its deadline.
	_, out, err := call(socket, nil, bytes.Repeat([]byte("x"), 8<<20), time.Now().Add(replyTimeout))
	if err == nil || out != nil || err.Error() != "the pyabouts agent at "+socket+" did not answer whole (i/o timeout)" {
		t.Fatalf("got %q %v", out, err)
	}
}

func TestCallReportsAnAgentThatDiesMidRequest(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	for _, partial := range []string{"", "0", "1"} {
		partial := partial
		agent(t, socket, func(conn net.Conn, _ []byte) { conn.Write([]byte(partial)) })
		_, out, err := call(socket, nil, []byte("{}"), time.Now().Add(replyTimeout))
		if err == nil || out != nil || !strings.Contains(err.Error(), "ended the connection before answering") || !strings.Contains(err.Error(), socket) {
			t.Fatalf("after %q: got %q %v", partial, out, err)
		}
		os.Remove(socket)
	}
}

func TestCallPrintsNothingOfAReplyCutShortByTheTimeout(t *testing.T) {
	defer func(saved time.Duration) { replyTimeout = saved }(replyTimeout)
	replyTimeout = 200 * time.Millisecond
	socket := filepath.Join(t.TempDir(), "agent.sock")
	agent(t, socket, func(conn net.Conn, _ []byte) {
		conn.Write([]byte("0\x00{\"cniVersion\":")) // and then nothing more, for too long
		time.Sleep(time.Second)
	})
	_, out, err := call(socket, nil, []byte("{}"), time.Now().Add(replyTimeout))
	if err == nil || out != nil || err.Error() != "the pyabouts agent at "+socket+" did not answer whole (i/o timeout)" {
		t.Fatalf("got %q %v", out, err)
	}
}

func TestCallNamesTheSocketWhenNoAgentListens(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "a.sock")
	_, _, err := call(missing, nil, nil, time.Now().Add(replyTimeout))
	if err == nil || err.Error() != "no pyabouts agent at "+missing+": no such file or directory" {
		t.Fatalf("got %v", err)
	}
}

func TestCallNamesTheSocketOfADeadAgent(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "dead.sock")
	listener, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	listener.(*net.UnixListener).SetUnlinkOnClose(false)
	listener.Close() // the file stays, nobody listens: a dead agent's socket
	_, _, err = call(socket, nil, nil, time.Now().Add(replyTimeout))
	if err == nil || err.Error() != "no pyabouts agent at "+socket+": connection refused" {
		t.Fatalf("got %v", err)
	}
}

func TestAgentSocket(t *testing.T) {
	t.Setenv("PYABOUTS_AGENT_SOCKET", "")
	if got := agentSocket(); got != "/run/pyabouts/agent.sock" {
		t.Fatalf("got %q", got)
	}
	t.Setenv("PYABOUTS_AGENT_SOCKET", "/elsewhere.sock")
	if got := agentSocket(); got != "/elsewhere.sock" {
		t.Fatalf("got %q", got)
	}
}

func TestMainRefusesASocketPathThatCannotNameTheAgentsSocket(t *testing.T) {
	for path, says := range map[string]string{
		"@abstract":                    "is not an absolute path",
		"relative/agent.sock":          "is not an absolute path",
		"/" + strings.Repeat("x", 107): "108 bytes long",
	} {
		out, code := runMain(t, `{"cniVersion":"1.0.0"}`, "CNI_COMMAND=ADD", "PYABOUTS_AGENT_SOCKET="+path)
		var failure struct {
			Code int    `json:"code"`
			Msg  string `json:"msg"`
		}
		if err := json.Unmarshal([]byte(out), &failure); err != nil || code != 1 {
			t.Fatalf("%q: got %d %q", path, code, out)
		}
		if failure.Code != 4 || !strings.Contains(failure.Msg, says) {
			t.Fatalf("%q: got %+v", path, failure)
		}
	}
}

func TestCniEnvironKeepsOnlyCniEntries(t *testing.T) {
	got := cniEnviron([]string{"PATH=/bin", "CNI_COMMAND=DEL", "XCNI_A=b", "CNI_ARGS="})
	if strings.Join(got, ",") != "CNI_COMMAND=DEL,CNI_ARGS=" {
		t.Fatalf("got %q", got)
	}
}

// runMain runs this test binary as the shim (TestMain hands over to main) with env and stdin.
func runMain(t *testing.T, stdin string, env ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append([]string{"PYABOUTS_SHIM_TEST_MAIN=1"}, env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	err := cmd.Run()
	code := 0
	if exitErr, ok := err.(*exec.ExitError); ok {
		code = exitErr.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), code
}

func TestMain(m *testing.M) {
	if os.Getenv("PYABOUTS_SHIM_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestMainAnswersVersionWithoutAnAgent(t *testing.T) {
	out, code := runMain(t, "", "CNI_COMMAND=VERSION", "PYABOUTS_AGENT_SOCKET=/nonexistent")
	var version map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &version) != nil || version["cniVersion"] != "1.1.0" {
		t.Fatalf("got %d %q", code, out)
	}
}

func TestMainPrintsCode11InTheCallersVersionWithoutAnAgent(t *testing.T) {
	out, code := runMain(t, `{"cniVersion":"0.4.0","name":"n"}`, "CNI_COMMAND=ADD", "PYABOUTS_AGENT_SOCKET=/nonexistent.sock")
	var failure struct {
		CNIVersion string `json:"cniVersion"`
		Code       int    `json:"code"`
		Msg        string `json:"msg"`
	}
	if err := json.Unmarshal([]byte(out), &failure); err != nil || code != 1 {
		t.Fatalf("got %d %q", code, out)
	}
	if failure.CNIVersion != "0.4.0" || failure.Code != 11 || !strings.Contains(failure.Msg, "no pyabouts agent at /nonexistent.sock") {
		t.Fatalf("got %+v", failure)
	}
}

func TestMainAnswersAConfigWithoutAVersionInTheLatestAsTheAgentDoes(t *testing.T) {
	for _, stdin := range []string{`{"name":"n"}`, `not json`} {
		out, code := runMain(t, stdin, "CNI_COMMAND=ADD", "PYABOUTS_AGENT_SOCKET=/nonexistent.sock")
		var failure struct {
			CNIVersion string `json:"cniVersion"`
			Code       int    `json:"code"`
		}
		if err := json.Unmarshal([]byte(out), &failure); err != nil || code != 1 {
			t.Fatalf("%q: got %d %q", stdin, code, out)
		}
		// plugin/cni.py's LATEST_VERSION, which the agent's errors then carry
		if failure.CNIVersion != "1.1.0" || failure.Code != 11 {
			t.Fatalf("%q: got %+v", stdin, failure)
		}
	}
}

func TestMainAnswersStatusWithCode50WithoutAnAgent(t *testing.T) {
	out, code := runMain(t, `{"cniVersion":"1.1.0","name":"n"}`, "CNI_COMMAND=STATUS", "PYABOUTS_AGENT_SOCKET=/nonexistent.sock")
	var failure struct {
		Code int    `json:"code"`
		Msg  string `json:"msg"`
	}
	if err := json.Unmarshal([]byte(out), &failure); err != nil || code != 1 {
		t.Fatalf("got %d %q", code, out)
	}
	if failure.Code != 50 || !strings.Contains(failure.Msg, "no pyabouts agent at /nonexistent.sock") {
		t.Fatalf("got %+v", failure)
	}
}

func TestMainPassesTheAgentsExitCodeAndStdout(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	agent(t, socket, func(conn net.Conn, request []byte) {
		if !bytes.Contains(request, []byte("CNI_COMMAND=DEL\x00")) || bytes.Contains(request, []byte("HOME=")) {
			conn.Write([]byte("99\x00unexpected request"))
			return
		}
		conn.Write([]byte("3\x00{\"code\":3}"))
	})
	out, code := runMain(t, "{}", "CNI_COMMAND=DEL", "HOME=/root", "PYABOUTS_AGENT_SOCKET="+socket)
	if code != 3 || out != `{"code":3}` {
		t.Fatalf("got %d %q", code, out)
	}
}

func TestCallRefusesAnAnswerCutShortInItsJSON(t *testing.T) {
	// The agent killed while it sent its answer: the exit code arrived, the JSON did not whole.
	socket := filepath.Join(t.TempDir(), "agent.sock")
	agent(t, socket, func(conn net.Conn, _ []byte) {
		conn.Write([]byte("0\x00" + `{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.`))
	})
	_, out, err := call(socket, nil, []byte("{}"), time.Now().Add(replyTimeout))
	if err == nil || out != nil || !strings.Contains(err.Error(), "in the middle of its answer") {
		t.Fatalf("got %q %v", out, err)
	}
}

func TestCallSaysAnAgentWhoseBacklogIsFullIsBusy(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: socket}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil { // never accepts: the backlog fills at once
		t.Fatal(err)
	}
	var last error
	for i := 0; i < 8 && last == nil; i++ {
		_, _, last = call(socket, nil, nil, time.Now().Add(50*time.Millisecond))
		if last != nil && strings.Contains(last.Error(), "did not answer whole") {
			last = nil // taken into the backlog, and never answered: fill on
		}
	}
	if last == nil || last.Error() != "the pyabouts agent at "+socket+" is busy (its backlog is full)" {
		t.Fatalf("got %v", last)
	}
}

func TestCniEnvironLeavesOutEntriesWithoutAValue(t *testing.T) {
	got := cniEnviron([]string{"CNI_JUNK", "CNI_COMMAND=ADD"})
	if strings.Join(got, ",") != "CNI_COMMAND=ADD" {
		t.Fatalf("got %q", got)
	}
}

func TestMainTellsTheAgentWhenItStopsWaiting(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "agent.sock")
	sent := make(chan int64, 1)
	agent(t, socket, func(conn net.Conn, request []byte) {
		_, after, _ := bytes.Cut(request, []byte(deadlineKey+"="))
		digits, _, _ := bytes.Cut(after, []byte{0})
		millis, _ := strconv.ParseInt(string(digits), 10, 64)
		sent <- millis
		conn.Write([]byte("0\x00"))
	})
	started := time.Now()
	if out, code := runMain(t, "{}", "CNI_COMMAND=DEL", "PYABOUTS_AGENT_SOCKET="+socket); code != 0 {
		t.Fatalf("got %d %q", code, out)
	}
	gives := time.UnixMilli(<-sent)
	if gives.Before(started.Add(replyTimeout)) || gives.After(time.Now().Add(replyTimeout)) {
		t.Fatalf("it gives up at %v, started at %v", gives, started)
	}
}
