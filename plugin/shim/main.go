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
	"net"
	"os"
	"strings"
	"time"
)

// socketSlot is where `pyabouts-install --agent-socket` writes the agent's socket path into
// this binary: a marker, then 512 bytes, the path padded with NUL bytes (the installer rewrites
// them in place: plugin/install.py, shim_with_socket). Empty, the default path applies.
var socketSlot = slotMarker + nul64 + nul64 + nul64 + nul64 + nul64 + nul64 + nul64 + nul64

// replyTimeout bounds a call: the agent answers within its 60 s command deadline.
var replyTimeout = 90 * time.Second

// A constant, so that the slot is one literal in the binary.
const nul64 = "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00" +
	"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"

const (
	slotMarker    = "PYABOUTS-AGENT-SOCKET-SLOT:"
	defaultSocket = "/run/pyabouts/agent.sock"
	tryAgainLater = 11
	// plugin/cni.py's render_version(); tests/integration/test_shim.py compares them.
	versionReply = `{"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}`
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
	code, out, err := call(agentSocket(), cniEnviron(os.Environ()), stdin)
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

// cniEnviron keeps the CNI_* entries: all that a call passes to its plugin.
func cniEnviron(environ []string) []string {
	var kept []string
	for _, entry := range environ {
		if strings.HasPrefix(entry, "CNI_") {
			kept = append(kept, entry)
		}
	}
	return kept
}

// call sends one request to the agent at socket and returns its exit code and stdout; an
// error when no agent answered whole.
func call(socket string, environ []string, config []byte) (int, []byte, error) {
	request, err := encodeRequest(environ, config)
	if err != nil {
		return 0, nil, err
	}
	conn, err := net.DialTimeout("unix", socket, replyTimeout)
	if err != nil {
		return 0, nil, fmt.Errorf("no pyabouts agent at %s: %v", socket, unwrapped(err))
	}
	defer conn.Close()
	unix := conn.(*net.UnixConn)
	_ = unix.SetDeadline(time.Now().Add(replyTimeout))
	// A failed write is not the end: the agent may have answered without reading (too large,
	// shutting down), and its answer is what counts.
	if _, err := unix.Write(request); err == nil {
		_ = unix.CloseWrite()
	}
	// A read that failed (timed out) may have cut the reply short: nothing of it is printed.
	reply, err := io.ReadAll(unix)
	if err != nil {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s did not answer whole (%v)", socket, unwrapped(err))
	}
	code, out, err := decodeReply(reply)
	if err != nil {
		return 0, nil, fmt.Errorf("the pyabouts agent at %s ended the connection before answering (%v)", socket, err)
	}
	return code, out, nil
}

// unwrapped drops the "dial unix <path>: connect:" wrapping: the message names the socket once.
func unwrapped(err error) error {
	var sysErr *os.SyscallError
	if errors.As(err, &sysErr) {
		return sysErr.Err
	}
	var opErr *net.OpError
	if errors.As(err, &opErr) {
		return opErr.Err
	}
	return err
}

// fail prints a CNI error with code 11 (try again later) and exits 1: the outcome is unknown,
// so the runtime retries the call.
func fail(stdin []byte, message string) {
	var netconf struct {
		CNIVersion string `json:"cniVersion"`
	}
	if json.Unmarshal(stdin, &netconf) != nil || netconf.CNIVersion == "" {
		netconf.CNIVersion = "1.0.0"
	}
	out, _ := json.Marshal(map[string]any{"cniVersion": netconf.CNIVersion, "code": tryAgainLater, "msg": message})
	os.Stdout.Write(out)
	os.Exit(1)
}
