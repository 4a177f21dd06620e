package upgrade

// IsHop reports whether a field is connection-level: it never crosses the edge (the
// edge writes its own Host and framing).
func IsHop(name string) bool {
	switch len(name) {
	case 2:
		return equalFold(name, "TE")
	case 4:
		return equalFold(name, "Host")
	case 7:
		return equalFold(name, "Trailer") || equalFold(name, "Upgrade")
	case 10:
		return equalFold(name, "Connection") || equalFold(name, "Keep-Alive")
	case 14:
		return equalFold(name, "Content-Length")
	case 16:
		return equalFold(name, "Proxy-Connection")
	case 17:
		return equalFold(name, "Transfer-Encoding")
	case 18:
		return equalFold(name, "Proxy-Authenticate")
	case 19:
		return equalFold(name, "Proxy-Authorization")
	}
	return false
}

// NamedByConnection reports whether a Connection field lists name.
func NamedByConnection(fields []Field, name string) bool {
	for _, f := range fields {
		if equalFold(f.Name, "Connection") && HasToken(f.Value, name) {
			return true
		}
	}
	return false
}
