"""A QMP client over TLS (Python's ssl module).

Usage: tls_client.py PORT CA_CERT CLIENT_CERT|- CLIENT_KEY|- COMMAND...
Prints a JSON list: each command's reply, or {"tls-error": ...} if the handshake
or the connection fails.
"""

import json
import socket
import ssl
import sys

port, ca, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
commands = sys.argv[5:]
context = ssl.create_default_context(cafile=ca)
if cert != "-":
    context.load_cert_chain(cert, key)
results = []
try:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with context.wrap_socket(raw, server_hostname="localhost") as tls:
        reader = tls.makefile("rb")
        greeting = json.loads(reader.readline())
        assert "QMP" in greeting, greeting
        for name in ["qmp_capabilities", *commands]:
            tls.sendall(json.dumps({"execute": name}).encode())
            line = reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            results.append(json.loads(line))
except (ssl.SSLError, ConnectionError, OSError) as e:
    results.append({"tls-error": str(e)})
print(json.dumps(results))
