//go:build unix

package nodeipc

import (
	"bytes"
	"fmt"
)

// lineReader splits a byte stream into '\n'-terminated lines, holding at most max bytes of an
// incomplete line.
type lineReader struct {
	buf []byte
	max int
}

// push feeds p and calls fn for every complete line, without its '\n'. The slice passed to fn
// is only valid during the call. A line longer than max bytes fails with ErrLineTooLong; an
// error from fn stops the split and is returned.
func (l *lineReader) push(p []byte, fn func(line []byte) error) error {
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			if len(l.buf)+len(p) > l.max {
				return fmt.Errorf("%w (%d bytes without a newline, limit %d)", ErrLineTooLong, len(l.buf)+len(p), l.max)
			}
			l.buf = append(l.buf, p...)
			return nil
		}
		line := p[:i]
		if len(l.buf) > 0 {
			if len(l.buf)+i > l.max {
				return fmt.Errorf("%w (%d bytes, limit %d)", ErrLineTooLong, len(l.buf)+i, l.max)
			}
			l.buf = append(l.buf, line...)
			line = l.buf
		} else if i > l.max {
			return fmt.Errorf("%w (%d bytes, limit %d)", ErrLineTooLong, i, l.max)
		}
		err := fn(line)
		if cap(l.buf) > 64<<10 {
			l.buf = nil // do not keep a huge buffer after one long line
		} else {
			l.buf = l.buf[:0]
		}
		if err != nil {
			return err
		}
		p = p[i+1:]
	}
	return nil
}
