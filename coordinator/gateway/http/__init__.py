"""The gateway's client side: HTTP/1.1 server, connections, responses, validation."""
