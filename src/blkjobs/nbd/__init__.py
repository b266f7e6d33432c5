"""The NBD protocol: constants and wire formats (proto), a server (server,
handshake, transmission). Independent of the daemon and the block graph."""
