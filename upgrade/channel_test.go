package upgrade

import (
	"errors"
	"io"
	"math"
	"os"
	"strings"
	"testing"
	"time"
)

func TestChannel_RoundTripAndEOF(t *testing.T) {
	g1, childEnd, err := newChannelPair()
	if err != nil {
		t.Fatal(err)
	}
	defer g1.Close()
	g2 := &Channel{f: childEnd}
	want := Msg{Kind: KindWorkers, Pid: 42, PGIDs: []int{43, 44}}
	if err := g2.Send(want); err != nil {
		t.Fatal(err)
	}
	if err := g2.Send(Msg{Kind: KindServing, Pid: 42}); err != nil {
		t.Fatal(err)
	}
	got, err := g1.Recv()
	if err != nil || got.Kind != want.Kind || got.Pid != 42 || len(got.PGIDs) != 2 || got.PGIDs[1] != 44 {
		t.Fatalf("Recv = %+v, %v; want %+v", got, err, want)
	}
	g2.Close()
	// Packets keep their boundaries; what was sent before the close is
	// read before EOF.
	if got, err := g1.Recv(); err != nil || got.Kind != KindServing {
		t.Fatalf("second Recv = %+v, %v", got, err)
	}
	if _, err := g1.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("Recv after the peer closed: %v, want EOF", err)
	}
}

func TestChannel_CloseWakesRecv(t *testing.T) {
	g1, childEnd, err := newChannelPair()
	if err != nil {
		t.Fatal(err)
	}
	defer childEnd.Close()
	done := make(chan error, 1)
	go func() {
		_, err := g1.Recv()
		done <- err
	}()
	g1.Close()
	if err := <-done; !errors.Is(err, os.ErrClosed) {
		t.Errorf("Recv after Close: %v, want os.ErrClosed", err)
	}
}

func TestDecodeMsg(t *testing.T) {
	for _, ok := range []string{
		`{"kind":"hello","pid":7,"version":"v1"}`,
		`{"kind":"config","to":7,"workers":3,"gen":2,"future_field":true}`, // a newer master's extra field
		`{"kind":"something-new"}`,                                         // for the receiver to skip
	} {
		if _, err := DecodeMsg([]byte(ok)); err != nil {
			t.Errorf("DecodeMsg(%s): %v", ok, err)
		}
	}
	for _, bad := range []string{``, `{}`, `[]`, `{"kind":1}`, `{"kind":"x","pid":-1}`, `{"kind":"x","pgids":[0]}`, `{"kind":"x"} trailing`, strings.Repeat(" ", maxMessage+1)} {
		if _, err := DecodeMsg([]byte(bad)); !errors.Is(err, ErrMessage) {
			t.Errorf("DecodeMsg(%q) = %v, want ErrMessage", bad, err)
		}
	}
	if _, err := EncodeMsg(Msg{Kind: KindFailed, Reason: strings.Repeat("x", maxMessage)}); err == nil {
		t.Error("an oversized message was encoded")
	}
}

func FuzzDecodeMsg(f *testing.F) {
	for _, s := range []string{`{"kind":"hello","pid":7}`, `{"kind":"workers","pgids":[1,2]}`, `{`, `null`, `{"kind":"failed","code":12,"reason":"x"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := DecodeMsg(b)
		if err != nil {
			if !errors.Is(err, ErrMessage) {
				t.Fatalf("error %v does not wrap ErrMessage", err)
			}
			return
		}
		if m.Kind == "" || m.Pid < 0 || m.To < 0 {
			t.Fatalf("accepted %+v", m)
		}
		if _, err := EncodeMsg(m); err != nil && len(b) <= maxMessage/2 {
			t.Fatalf("re-encoding an accepted message failed: %v", err)
		}
	})
}

// TestChannel_SendDoesNotBlockOnAPeerThatStoppedReading: a Send to a
// peer whose socket buffer is full gives up within SendTimeout instead of
// blocking the sender's loop.
func TestChannel_SendDoesNotBlockOnAPeerThatStoppedReading(t *testing.T) {
	g1, childEnd, err := newChannelPair()
	if err != nil {
		t.Fatal(err)
	}
	defer g1.Close()
	defer childEnd.Close() // never read
	msg := Msg{Kind: KindConfig, Reason: strings.Repeat("x", 4000)}
	for i := 0; i < 10000; i++ {
		start := time.Now()
		err := g1.Send(msg)
		if took := time.Since(start); took > SendTimeout+time.Second {
			t.Fatalf("Send %d blocked for %v", i, took)
		}
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("Send %d to a full buffer: %v, want a deadline error", i, err)
			}
			return
		}
	}
	t.Fatal("10000 sends of 4 KB never filled the socket buffer")
}

// TestDecodeMsg_Figures: the figures of a generation cross as exact
// 64-bit counts, and an oversized vector is refused.
func TestDecodeMsg_Figures(t *testing.T) {
	want := []uint64{0, 1, 1<<63 + 5, 999_999_999_999_999}
	b, err := EncodeMsg(Msg{Kind: KindFigures, To: 7, Gen: 3, Figures: want})
	if err != nil {
		t.Fatal(err)
	}
	got, err := DecodeMsg(b)
	if err != nil || got.Gen != 3 || len(got.Figures) != len(want) {
		t.Fatalf("DecodeMsg = %+v, %v", got, err)
	}
	for i := range want {
		if got.Figures[i] != want[i] {
			t.Errorf("figure %d = %d, want %d", i, got.Figures[i], want[i])
		}
	}
	for _, bad := range []string{
		`{"kind":"figures","figures":[-1]}`,
		`{"kind":"figures","figures":[1.5]}`,
		`{"kind":"figures","figures":[18446744073709551616]}`,
		`{"kind":"figures","figures":[` + strings.Repeat("0,", MaxFigures) + `0]}`,
	} {
		if m, err := DecodeMsg([]byte(bad)); !errors.Is(err, ErrMessage) {
			t.Errorf("DecodeMsg(%.50s) = %+v, %v; want ErrMessage", bad, m, err)
		}
	}
}

// TestChannel_WorkerFiguresAreBounded: a worker-figures message carries
// at most MaxSources workers, each named and of at most MaxFigures
// counts; a full one fits in a packet.
func TestChannel_WorkerFiguresAreBounded(t *testing.T) {
	full := make([]uint64, 25)
	for i := range full {
		full[i] = math.MaxUint64
	}
	var srcs []Source
	for i := range MaxSources {
		srcs = append(srcs, Source{ID: 4194304 - i, Figures: full})
	}
	b, err := EncodeMsg(Msg{Kind: KindWorkerFigures, To: 4194304, Pid: 4194304, Gen: 1 << 30, Sources: srcs})
	if err != nil {
		t.Fatalf("a full message: %v", err)
	}
	if m, err := DecodeMsg(b); err != nil || len(m.Sources) != MaxSources || m.Sources[0].Figures[24] != full[24] {
		t.Fatalf("decoded %+v, %v", m.Sources[:1], err)
	}
	for name, bad := range map[string]string{
		"too many":     `{"kind":"worker-figures","sources":[` + strings.Repeat(`{"id":1,"figures":[1]},`, MaxSources) + `{"id":1,"figures":[1]}]}`,
		"no id":        `{"kind":"worker-figures","sources":[{"figures":[1]}]}`,
		"negative id":  `{"kind":"worker-figures","sources":[{"id":-3,"figures":[1]}]}`,
		"long vector":  `{"kind":"worker-figures","sources":[{"id":3,"figures":[` + strings.Repeat("1,", MaxFigures) + `1]}]}`,
		"negative one": `{"kind":"worker-figures","sources":[{"id":3,"figures":[-1]}]}`,
	} {
		if _, err := DecodeMsg([]byte(bad)); !errors.Is(err, ErrMessage) {
			t.Errorf("%s: %v, want ErrMessage", name, err)
		}
	}
}
