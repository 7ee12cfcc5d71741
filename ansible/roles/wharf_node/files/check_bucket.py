"""Lists the storage of a Wharf configuration with its own settings: site.yml's S3 bucket check.

Run with the node's Python (`wharf_node_venv/bin/python check_bucket.py CONFIG`); exits 1 with one
line saying why when the bucket is missing or refuses the keys. It reads and writes nothing else.
"""

import asyncio
import sys

from node.config import load
from node.storage import layout
from node.store import describe_storage, open_storage


async def check(path: str) -> int:
    config = load(path)
    where = describe_storage(config)
    if config.storage.s3 is None:
        print(f"{where}: not S3, nothing to check")
        return 0
    driver = open_storage(config)
    try:
        async for _key in driver.list(layout.ROOT):
            break
    except Exception as exc:
        print(f"{where}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await driver.close()
    print(f"{where}: answers")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(check(sys.argv[1])))
