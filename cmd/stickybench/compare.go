package main

import (
	"context"
	"io"
)

func runCompare(ctx context.Context, args []string, out io.Writer) error { return nil }
