package main

import (
	"bytes"
	"errors"
	"testing"
)

func TestEncodeRequestFramesEnvironmentThenConfig(t *testing.T) {
	got, err := encodeRequest([]string{"CNI_COMMAND=ADD", "CNI_ARGS=K8S_POD_NAME=a;B=c=d", "CNI_EMPTY="}, []byte(`{"x":1}`))
	if err != nil {
		t.Fatal(err)
	}
	want := "pyabouts/1\nCNI_COMMAND=ADD\x00CNI_ARGS=K8S_POD_NAME=a;B=c=d\x00CNI_EMPTY=\x00\x00{\"x\":1}"
	if string(got) != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestEncodeRequestWithNothing(t *testing.T) {
	got, err := encodeRequest(nil, nil)
	if err != nil || string(got) != "pyabouts/1\n\x00" {
		t.Fatalf("got %q, %v", got, err)
	}
}

func TestEncodeRequestRefusesWhatCannotBeFramed(t *testing.T) {
	for _, entry := range []string{"=value", "NOEQUALS", "CNI_A=b\x00c", "CNI\x00A=b"} {
		if _, err := encodeRequest([]string{entry}, nil); err == nil {
			t.Errorf("%q was framed", entry)
		}
	}
}

func TestDecodeReply(t *testing.T) {
	for _, tc := range []struct {
		reply string
		code  int
		out   string
	}{
		{"0\x00{\"ips\":[]}", 0, `{"ips":[]}`},
		{"1\x00", 1, ""},
		{"255\x00a\x00b", 255, "a\x00b"},
		{"007\x00x", 7, "x"},
	} {
		code, out, err := decodeReply([]byte(tc.reply))
		if err != nil || code != tc.code || !bytes.Equal(out, []byte(tc.out)) {
			t.Errorf("%q: got %d %q %v", tc.reply, code, out, err)
		}
	}
}

func TestDecodeReplyRefusesWhatAnAgentDidNotFinish(t *testing.T) {
	for _, reply := range []string{"", "0", "12", "\x00out", "-1\x00", "1a\x00", " 1\x00"} {
		if _, _, err := decodeReply([]byte(reply)); !errors.Is(err, errShortReply) {
			t.Errorf("%q: got %v, want errShortReply", reply, err)
		}
	}
}

func TestDecodeReplyRefusesAnExitCodeOverOneByte(t *testing.T) {
	for _, reply := range []string{"256\x00", "99999999999999999999999\x00"} {
		if _, _, err := decodeReply([]byte(reply)); err == nil {
			t.Errorf("%q was decoded", reply)
		}
	}
}
