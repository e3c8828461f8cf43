"""A separate process that writes through LocalStore, for crash and race tests.

    _worker.py put_file ROOT KEY SOURCE   upload SOURCE (a fifo in the tests) to KEY
    _worker.py race ROOT N PAYLOAD        print "ready", wait for a line on stdin, then
                                          put_if_absent race/0..N-1 and print the wins
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from millstream.datastore.local import LocalStore


async def main(argv: list[str]) -> None:
    """Run the command named in ``argv``."""
    command, root = argv[0], Path(argv[1])
    if command == "put_file":
        await LocalStore(root).put_file(argv[2], Path(argv[3]))
    elif command == "race":
        store = LocalStore(root, durable=False)
        count, payload = int(argv[2]), argv[3].encode()
        print("ready", flush=True)
        sys.stdin.readline()
        wins = [await store.put_if_absent(f"race/{i}", payload) for i in range(count)]
        print(json.dumps(wins), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
