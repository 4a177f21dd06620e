package deps
import (
 _ "github.com/gorilla/websocket"
 _ "github.com/cespare/xxhash/v2"
 _ "github.com/prometheus/client_golang/prometheus"
 _ "github.com/prometheus/client_golang/prometheus/promhttp"
 _ "github.com/prometheus/client_golang/prometheus/collectors"
 _ "github.com/prometheus/common/expfmt"
 _ "golang.org/x/sys/unix"
)
