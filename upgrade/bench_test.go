package upgrade

import "testing"

func BenchmarkParseInto(b *testing.B) {
	for _, bc := range []struct{ name, head string }{
		{"websocket", wsHead},
		{"polling", pollHead},
	} {
		b.Run(bc.name, func(b *testing.B) {
			buf := []byte(bc.head)
			h := Head{Fields: make([]Field, 0, 32)}
			b.SetBytes(int64(len(buf)))
			b.ReportAllocs()
			for b.Loop() {
				if err := ParseInto(&h, buf, 0); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkParse(b *testing.B) {
	buf := []byte(wsHead)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(buf, 0); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkParseEngineIO(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		ParseEngineIO("EIO=4&transport=polling&t=OqVx1kz&sid=lv_VI97HAXpY6yYWAAAC")
	}
}

func BenchmarkOpenPacketSID(b *testing.B) {
	body := []byte(`0{"sid":"lv_VI97HAXpY6yYWAAAC","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}`)
	b.ReportAllocs()
	for b.Loop() {
		OpenPacketSID(body)
	}
}
