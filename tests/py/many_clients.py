"""Many qemu.qmp clients on one gateway at once.

Usage: many_clients.py SOCKET CLIENTS ROUNDS

Every client creates its own memory-backend-ram object with a size no other client
uses, then reads that size back ROUNDS times, interleaved with every other client.
qemu.qmp numbers its ids the same way in every client, so each reply reaching the
right client proves the gateway's id routing. Meanwhile one client resumes and
stops the VM, and every client must see both RESUME and STOP.

Prints a JSON summary: replies checked, misrouted replies, events seen per client.
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, QMPClient

MIB = 1 << 20


async def client(i: int, path: str, rounds: int, ready: asyncio.Barrier, done: asyncio.Event, summary: dict):
    qmp = QMPClient(f"client{i}")
    listener = EventListener(("STOP", "RESUME"))
    qmp.register_listener(listener)
    await asyncio.wait_for(qmp.connect(path), 20)
    size = (i + 1) * MIB
    await qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": f"mem{i}", "size": size})
    await ready.wait()
    if i == 0:
        await qmp.execute("cont")
        await qmp.execute("stop")
    for _ in range(rounds):
        got = await qmp.execute("qom-get", {"path": f"/objects/mem{i}", "property": "size"})
        summary["checked"] += 1
        if got != size:
            summary["misrouted"] += 1
    seen = set()
    try:
        while seen != {"STOP", "RESUME"}:
            event = await asyncio.wait_for(listener.get(), 20)
            seen.add(event["event"])
    except asyncio.TimeoutError:
        pass
    summary["events"][i] = sorted(seen)
    await qmp.execute("object-del", {"id": f"mem{i}"})
    await qmp.disconnect()


async def main(path: str, clients: int, rounds: int) -> None:
    ready = asyncio.Barrier(clients)
    done = asyncio.Event()
    summary = {"checked": 0, "misrouted": 0, "events": {}}
    await asyncio.gather(*(client(i, path, rounds, ready, done, summary) for i in range(clients)))
    print(json.dumps(summary))


asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
