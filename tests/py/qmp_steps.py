"""Drive a QMP socket with the official qemu.qmp client.

Usage: qmp_steps.py SOCKET STEPS_JSON
STEPS_JSON is a list of {"execute": name, "arguments": {...}}; prints a JSON list
with {"return": ...} or {"error": {"class": ..., "desc": ...}} per step.
"""

import asyncio
import json
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(path: str, steps: list) -> None:
    qmp = QMPClient("qmpgate-test")
    await asyncio.wait_for(qmp.connect(path), 20)
    results = []
    for step in steps:
        try:
            ret = await asyncio.wait_for(qmp.execute(step["execute"], step.get("arguments")), 20)
            results.append({"return": ret})
        except ExecuteError as e:
            results.append({"error": {"class": e.error.error.class_, "desc": e.error.error.desc}})
    await qmp.disconnect()
    print(json.dumps(results))


asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
