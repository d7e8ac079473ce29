// Command pyabouts-shim is the node's `pyabouts` CNI plugin where the node agent serves the
// calls: it hands each call to pyabouts-agent over its unix socket and prints the answer. It
// decides nothing. Static, standard library only, so that it runs on nodes without Python and
// inside Multus thick's daemon container at its memory limit.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"time"
)

// socketSlot is where `pyabouts-install --agent-socket` writes the agent's socket path into
// this binary: a marker, then 512 bytes, the path padded with NUL bytes (the installer rewrites
// them in place: plugin/install.py, shim_with_socket). Empty, the default path applies.
var socketSlot = slotMarker + nul64 + nul64 + nul64 + nul64 + nul64 + nul64 + nul64 + nul64

// replyTimeout bounds a call: the agent answers within its 60 s command deadline, and starts
// no command after the time the request gives it (deadlineKey), so none is carried out once
// this one has given up on it (queued while the agent was stalled, say).
var replyTimeout = 90 * time.Second

// A constant, so that the slot is one literal in the binary.
const nul64 = "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

const (
	slotMarker    = "PYABOUTS-AGENT-SOCKET-SLOT:"
	defaultSocket = "/run/pyabouts/agent.sock"
	invalidEnv    = 4 // CNI: invalid necessary environment variables
	tryAgainLater = 11
	// A unix socket's path holds fewer bytes than sun_path's 108 (serving/listen.py's limit).
	unixPathMax  = 108
	notAvailable = 50 // STATUS: the plugin cannot serve ADD now (CNI 1.1)
	// plugin/cni.py's LATEST_VERSION and render_version(); tests/integration/test_shim.py
	// compares them.
	latestVersion = "1.1.0"
	versionReply  = `{"cniVersion": "` + latestVersion + `", "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}`
)

func main() {
	if os.Getenv("CNI_COMMAND") == "VERSION" {
		os.Stdout.WriteString(versionReply)
		return
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(stdin, fmt.Sprintf("reading the network configuration: %v", err))
	}
	deadline := time.Now().Add(replyTimeout)
	environ := append(cniEnviron(os.Environ()), fmt.Sprintf("%s=%d", deadlineKey, deadline.UnixMilli()))
	socket := agentSocket()
	if os.Getenv("PYABOUTS_AGENT_SOCKET") != "" { // the installed one was checked at install
		if err := checkSocketPath(socket); err != nil {
			failWith(stdin, invalidEnv, err.Error())
		}
	}
	code, out, err := call(socket, environ, stdin, deadline)
	if err != nil {
		fail(stdin, err.Error())
	}
	os.Stdout.Write(out)
	os.Exit(code)
}

// agentSocket is PYABOUTS_AGENT_SOCKET if set, else the installed path. (Multus thick runs
// delegates chrooted into the host's root, so the host's path holds there too.)
func agentSocket() string {
	if path := os.Getenv("PYABOUTS_AGENT_SOCKET"); path != "" {
		return path
	}
	path := socketSlot[len(slotMarker):]
	if nul := strings.IndexByte(path, 0); nul >= 0 {
		path = path[:nul]
	}
	if path == "" {
		return defaultSocket
	}
	return path
}

// checkSocketPath refuses a path that cannot name the agent's socket, as the installer refuses
// it for the installed one: not absolute (resolved against the runtime's working directory, or,
// beginning with "@", an abstract socket that no file mode protects and any process of the
// host's network namespace may bind), or too long for connect().
func checkSocketPath(path string) error {
	if !strings.HasPrefix(path, "/") {
		return fmt.Errorf("PYABOUTS_AGENT_SOCKET=%q is not an absolute path", path)
	}
	if len(path) >= unixPathMax {
		return fmt.Errorf("PYABOUTS_AGENT_SOCKET=%q is %d bytes long: a unix socket's path has fewer than %d", path, len(path), unixPathMax)
	}
	return nil
}

// cniEnviron keeps the CNI_* entries: all that a call passes to its plugin. An entry without
// "=" (os.Environ keeps them, and so do runtimes) is no variable: left out, as the agent would
// read none from it, rather than failing every call.
func cniEnviron(environ []string) []string {
	var kept []string
	for _, entry := range environ {
		if strings.HasPrefix(entry, "CNI_") && strings.Contains(entry, "=") {
			kept = append(kept, entry)
		}
	}
	return kept
}

// call sends one request to the agent at socket and returns its exit code and stdout; an
// error when no agent answered whole.
//
// The socket is non-blocking and read and written through the runtime's poller (an os.File),
// not by blocking system calls: under load a call waits for the agent for tens to hundreds of
// milliseconds, and while a thread sits in a blocking system call the runtime's monitor
// (sysmon) wakes every 20 µs at first, then less often, until it takes the thread's P after
// 10 ms; with the goroutine parked on the poller every P is idle and the monitor sleeps. A call
// answered after 5 ms costs 0.3 ms less CPU so, one answered after 50 ms 0.5 ms less, and one
// answered at once 0.1 to 0.2 ms more (the poller's set-up). Not package net: against the
// blocking read before, it cost every call 0.15 to 0.18 ms of CPU more (the poller and its
// own set-up), and one connection needs none of the rest.
func call(socket string, environ []string, config []byte, deadline time.Time) (int, []byte, error) {
	request, err := encodeRequest(environ, config)
	if err != nil {
		return 0, nil, err
	}
	conn, err := dial(socket)
	if err == syscall.EAGAIN {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s is busy (its backlog is full)", socket)
	}
	if err != nil {
		return 0, nil, fmt.Errorf("no pyabouts agent at %s: %v", socket, err)
	}
	defer conn.Close()
	// A failed write is not the end: the agent may have answered without reading (too large,
	// shutting down), and its answer is what counts.
	if writeAll(conn, request, deadline) == nil {
		_ = shutdownWrite(conn)
	}
	// A read that failed (timed out) may have cut the reply short: nothing of it is printed.
	reply, err := readAll(conn, deadline)
	if err != nil {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s did not answer whole (%v)", socket, err)
	}
	code, out, err := decodeReply(reply)
	if err != nil {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s ended the connection before answering (%v)", socket, err)
	}
	// The agent prints JSON or nothing: anything else is an answer cut short (the agent
	// killed while it sent one), never to be printed as the outcome.
	if len(out) > 0 && !json.Valid(out) {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s ended the connection in the middle of its answer", socket)
	}
	return code, out, nil
}

// dial connects to the unix socket at path without waiting: an agent whose backlog is full
// answers EAGAIN at once, as one that is gone answers ENOENT or ECONNREFUSED. The socket stays
// non-blocking, so the os.File made of it is read and written through the poller.
func dial(path string) (*os.File, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	if err = syscall.Connect(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}

// errTimeout is a read or write that reached the call's deadline.
var errTimeout = errors.New("i/o timeout")

func writeAll(conn *os.File, data []byte, deadline time.Time) error {
	if err := conn.SetWriteDeadline(deadline); err != nil {
		return err
	}
	_, err := conn.Write(data) // the whole of it, or an error
	return err
}

// shutdownWrite tells the agent the request is whole: shutdown(2) on the descriptor the
// os.File holds, through SyscallConn, which keeps it from being closed meanwhile.
func shutdownWrite(conn *os.File) error {
	raw, err := conn.SyscallConn()
	if err != nil {
		return err
	}
	var shutdown error
	if err = raw.Control(func(fd uintptr) { shutdown = syscall.Shutdown(int(fd), syscall.SHUT_WR) }); err != nil {
		return err
	}
	return shutdown
}

// readAll reads conn to its end, by deadline.
func readAll(conn *os.File, deadline time.Time) ([]byte, error) {
	if err := conn.SetReadDeadline(deadline); err != nil {
		return nil, err
	}
	reply := make([]byte, 0, 4096)
	for {
		if len(reply) == cap(reply) {
			reply = append(reply, 0)[:len(reply)]
		}
		n, err := conn.Read(reply[len(reply):cap(reply)])
		reply = reply[:len(reply)+n]
		switch {
		case err == io.EOF:
			return reply, nil
		case errors.Is(err, syscall.ECONNRESET):
			// The agent answered without reading all of the request (a refusal) and closed:
			// the end of its answer, as at EOF (decodeReply checks that its code arrived).
			return reply, nil
		case errors.Is(err, os.ErrDeadlineExceeded):
			return nil, errTimeout
		case err != nil:
			return nil, bareError(err)
		}
	}
}

// bareError is err without the os.File's "read <path>:" before it: the message names the
// socket already.
func bareError(err error) error {
	var pathErr *os.PathError
	if errors.As(err, &pathErr) {
		return pathErr.Err
	}
	return err
}

// fail prints a CNI error with code 11 (try again later) and exits 1: the outcome is unknown,
// so the runtime retries the call. To STATUS it answers 50, as the spec asks of a plugin that
// cannot serve ADD. Its cniVersion is the config's, else the latest, as the agent's errors.
func fail(stdin []byte, message string) {
	code := tryAgainLater
	if os.Getenv("CNI_COMMAND") == "STATUS" {
		code = notAvailable
	}
	failWith(stdin, code, message)
}

// failWith prints a CNI error with code and exits 1.
func failWith(stdin []byte, code int, message string) {
	var netconf struct {
		CNIVersion string `json:"cniVersion"`
	}
	if json.Unmarshal(stdin, &netconf) != nil || netconf.CNIVersion == "" {
		netconf.CNIVersion = latestVersion
	}
	out, _ := json.Marshal(map[string]any{"cniVersion": netconf.CNIVersion, "code": code, "msg": message})
	os.Stdout.Write(out)
	os.Exit(1)
}
