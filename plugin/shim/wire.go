package main

// The shim's half of plugin/wire.py, the wire format between a node's CNI plugin and
// pyabouts-agent (that module's docstring is the specification): it encodes requests and decodes
// replies. tests/integration/test_shim.py runs both halves against each other.

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

var magic = []byte("pyabouts/1\n")

// deadlineKey names the request's entry that says when the plugin stops waiting for the reply,
// in Unix milliseconds (plugin/wire.py, DEADLINE_KEY).
const deadlineKey = "PYABOUTS_DEADLINE"

// errShortReply means the agent ended the connection before it had answered.
var errShortReply = errors.New("the reply ended before its exit code")

// encodeRequest frames environ ("KEY=VALUE" entries, as os.Environ gives them) and the
// plugin's stdin.
func encodeRequest(environ []string, config []byte) ([]byte, error) {
	var buf bytes.Buffer
	buf.Write(magic)
	for _, entry := range environ {
		key, _, found := strings.Cut(entry, "=")
		if !found || key == "" || strings.IndexByte(entry, 0) >= 0 {
			return nil, fmt.Errorf("environment entry %.40q cannot be framed", entry)
		}
		buf.WriteString(entry)
		buf.WriteByte(0)
	}
	buf.WriteByte(0)
	buf.Write(config)
	return buf.Bytes(), nil
}

// decodeReply returns the exit code and stdout of a whole reply.
func decodeReply(data []byte) (int, []byte, error) {
	nul := bytes.IndexByte(data, 0)
	if nul < 1 {
		return 0, nil, errShortReply
	}
	digits := data[:nul]
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, nil, errShortReply
		}
	}
	// An exit status is one byte: anything larger was not written by an agent.
	code, err := strconv.Atoi(string(digits))
	if err != nil || code > 255 {
		return 0, nil, fmt.Errorf("exit code %.12q is out of range", digits)
	}
	return code, data[nul+1:], nil
}
