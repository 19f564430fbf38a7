"""A real HTTP client for the status endpoint (urllib).

Usage: http_get.py URL                  print status code, content type, body as JSON
       http_get.py URL --method POST    same, with another method
       http_get.py URL --sse N          print the first N server-sent events as JSON lines
"""

import json
import sys
import urllib.error
import urllib.request

url = sys.argv[1]
if len(sys.argv) > 3 and sys.argv[2] == "--sse":
    wanted = int(sys.argv[3])
    with urllib.request.urlopen(url, timeout=20) as response:
        print(json.dumps({"content_type": response.headers.get("Content-Type")}), flush=True)
        event = {}
        while wanted > 0:
            line = response.readline().decode().rstrip("\n")
            if line.startswith("event:"):
                event["event"] = line[6:].strip()
            elif line.startswith("data:"):
                event["data"] = json.loads(line[5:].strip())
            elif line == "" and event:
                print(json.dumps(event), flush=True)
                event = {}
                wanted -= 1
    sys.exit(0)

method = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--method" else "GET"
request = urllib.request.Request(url, method=method)
try:
    with urllib.request.urlopen(request, timeout=20) as response:
        code, ctype, body = response.status, response.headers.get("Content-Type"), response.read().decode()
except urllib.error.HTTPError as e:
    code, ctype, body = e.code, e.headers.get("Content-Type"), e.read().decode()
print(json.dumps({"status": code, "content_type": ctype, "body": body}))
