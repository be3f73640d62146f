"""Drives `bitmirror serve` with PyPI's qemu.qmp client, as QEMU's own
tooling would. Usage: qemu_qmp_client.py QMP_SOCKET DIR. Exits non-zero,
with the reason, on the first surprise; prints "OK" at the end."""

import asyncio
import os
import sys

from qemu.qmp import ExecuteError, QMPClient


async def main(sock: str, d: str) -> None:
    qmp = QMPClient("bitmirror-test")
    await qmp.connect(sock)
    version = await qmp.execute("query-version")
    assert version["qemu"]["major"] == 10, version

    image = os.path.join(d, "disk.qcow2")
    # Create the image with a job, watching its events.
    with qmp.listener() as listener:
        await qmp.execute("blockdev-create", {
            "job-id": "c0",
            "options": {"driver": "file", "filename": image, "size": 0}})
        async for event in listener:
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "concluded":
                break
    await qmp.execute("job-dismiss", {"id": "c0"})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "f0", "filename": image})
    with qmp.listener() as listener:
        await qmp.execute("blockdev-create", {
            "job-id": "c1",
            "options": {"driver": "qcow2", "file": "f0", "size": 16 << 20}})
        async for event in listener:
            if event["event"] == "JOB_STATUS_CHANGE" and event["data"]["status"] == "concluded":
                break
    jobs = await qmp.execute("query-jobs")
    assert jobs == [{"id": "c1", "type": "create", "status": "concluded",
                     "current-progress": 1, "total-progress": 1}], jobs
    await qmp.execute("job-dismiss", {"id": "c1"})
    await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": "f0"})
    await qmp.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b0", "persistent": True})

    # Errors arrive as ExecuteError with QEMU's class and text.
    try:
        await qmp.execute("block-dirty-bitmap-add", {"node": "disk", "name": "b0"})
        raise AssertionError("a duplicate bitmap was accepted")
    except ExecuteError as e:
        assert e.error_class == "GenericError", e.error_class
        assert e.error.error.desc == "Bitmap already exists: b0", e.error
    try:
        await qmp.execute("no-such-command")
        raise AssertionError("an unknown command was accepted")
    except ExecuteError as e:
        assert e.error_class == "CommandNotFound", e.error_class

    nodes = await qmp.execute("query-named-block-nodes", {"flat": True})
    disk = next(n for n in nodes if n["node-name"] == "disk")
    assert disk["dirty-bitmaps"][0]["persistent"] is True, disk

    sock_nbd = os.path.join(d, "nbd.sock")
    await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock_nbd}}})
    await qmp.execute("block-export-add", {
        "type": "nbd", "id": "e0", "node-name": "disk", "writable": True})
    exports = await qmp.execute("query-block-exports")
    assert exports == [{"type": "nbd", "id": "e0", "node-name": "disk",
                        "shutting-down": False}], exports
    with qmp.listener() as listener:
        await qmp.execute("block-export-del", {"id": "e0"})
        event = await asyncio.wait_for(listener.get(), 10)
        assert event["event"] == "BLOCK_EXPORT_DELETED", event
        assert event["data"] == {"id": "e0"}, event
        assert set(event["timestamp"]) == {"seconds", "microseconds"}, event
    await qmp.execute("nbd-server-stop")
    await qmp.execute("quit")
    await qmp.disconnect()
    print("OK")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
