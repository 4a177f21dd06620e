package upgrade

import (
	"strings"
	"testing"
	"time"
)

func TestParseEngineIO(t *testing.T) {
	for _, tc := range []struct {
		q    string
		want EngineIO
		ok   bool
	}{
		{"EIO=4&transport=polling&t=OqVx1kz", EngineIO{"4", "polling", ""}, true},
		{"EIO=4&transport=websocket&sid=abc-_DEF", EngineIO{"4", "websocket", "abc-_DEF"}, true},
		{"sid=a%2Fb%3D&EIO=3&transport=polling&b64=1", EngineIO{"3", "polling", "a/b="}, true},
		{"sid=a+b&EIO=4", EngineIO{"4", "", "a b"}, true},
		{"E%49O=4&sid=x", EngineIO{"4", "", "x"}, true},
		{"EIO=4&sid=first&sid=second", EngineIO{"4", "", "first"}, true},
		{"EIO&sid=x", EngineIO{"", "", "x"}, true},
		{"transport=polling&sid=x", EngineIO{"", "polling", "x"}, false},
		{"", EngineIO{}, false},
		{"EIOX=4", EngineIO{}, false},
		{"EIO=4&sid=%zz", EngineIO{"4", "", ""}, true},
	} {
		got, ok := ParseEngineIO(tc.q)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("ParseEngineIO(%q) = %+v, %v; want %+v, %v", tc.q, got, ok, tc.want, tc.ok)
		}
	}
	q := "foo=bar&baz=qux&t=123"
	if a := testing.AllocsPerRun(100, func() { ParseEngineIO(q) }); a != 0 {
		t.Errorf("allocs without EIO = %v", a)
	}
	q = "EIO=4&transport=polling&sid=abc"
	if a := testing.AllocsPerRun(100, func() { ParseEngineIO(q) }); a != 0 {
		t.Errorf("allocs with plain EIO query = %v", a)
	}
}

func TestOpenPacketSID(t *testing.T) {
	const open4 = `0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}`
	const open3 = `{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":60000}`
	for _, tc := range []struct {
		name, body, sid string
		ok              bool
	}{
		{"EIO4", open4, "lv_VI97HAXpY6yYWAAAC", true},
		{"EIO4 with more packets", open4 + "\x1e40{\"sid\":\"other\"}", "lv_VI97HAXpY6yYWAAAC", true},
		{"EIO3 text", "97:0" + open3 + "2:40", "lv_VI97HAXpY6yYWAAAC", true},
		{"EIO3 binary", "\x00\x09\x07\xff0" + open3, "lv_VI97HAXpY6yYWAAAC", true},
		{"sid not first", `0{"upgrades":["websocket",{"a":[1,2]}],"n":-1.5e3,"t":true,"x":null,"sid":"abc"}`, "abc", true},
		{"whitespace", "0 { \"sid\" : \"abc\" }", "abc", true},
		{"truncated after sid", `0{"sid":"abc","upgrades":["web`, "abc", true},
		{"escaped key ignored", `0{"\u0073id":"abc"}`, "", false},
		{"escape in sid", `0{"sid":"a\"b"}`, "", false},
		{"sid not string", `0{"sid":123}`, "", false},
		{"empty sid", `0{"sid":""}`, "", false},
		{"bad sid char", `0{"sid":"a/b"}`, "", false},
		{"sid too long", `0{"sid":"` + strings.Repeat("a", 257) + `"}`, "", false},
		{"sid 256", `0{"sid":"` + strings.Repeat("a", 256) + `"}`, strings.Repeat("a", 256), true},
		{"nested sid ignored", `0{"x":{"sid":"inner"}}`, "", false},
		{"not open packet", `4{"sid":"abc"}`, "", false},
		{"message packet", `40{"sid":"abc"}`, "", false},
		{"error body", `{"code":1,"message":"Session ID unknown"}`, "", false},
		{"beyond 2KiB", `0{"pad":"` + strings.Repeat("x", 2100) + `","sid":"abc"}`, "", false},
		{"empty", "", "", false},
		{"EIO3 bad length", "97x0" + open3, "", false},
	} {
		sid, ok := OpenPacketSID([]byte(tc.body))
		if sid != tc.sid || ok != tc.ok {
			t.Errorf("%s: OpenPacketSID = %q, %v; want %q, %v", tc.name, sid, ok, tc.sid, tc.ok)
		}
	}
	b := []byte(open4)
	sid, _ := OpenPacketSID(b)
	b[9] = 'X'
	if sid != "lv_VI97HAXpY6yYWAAAC" {
		t.Error("OpenPacketSID result aliases body")
	}
}

func TestOpenPacketTimeout(t *testing.T) {
	for _, tc := range []struct {
		body string
		want time.Duration
		ok   bool
	}{
		{`0{"sid":"abc","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}`, 45 * time.Second, true},
		{`0{"pingTimeout":5000,"sid":"x","pingInterval":60000}`, 65 * time.Second, true},
		{"96:0{\"sid\":\"x\",\"pingInterval\":1000,\"pingTimeout\":2000}", 3 * time.Second, true},
		{`0{"sid":"abc","pingInterval":25000}`, 0, false},
		{`0{"sid":"abc","pingInterval":"25000","pingTimeout":1}`, 0, false},
		{`0{"sid":"abc","pingInterval":-1,"pingTimeout":1}`, 0, false},
		{`0{"sid":"abc","pingInterval":99999999999,"pingTimeout":1}`, 0, false},
		{`4hello`, 0, false},
	} {
		got, ok := OpenPacketTimeout([]byte(tc.body))
		if got != tc.want || ok != tc.ok {
			t.Errorf("%s: %v %v, want %v %v", tc.body, got, ok, tc.want, tc.ok)
		}
	}
}
