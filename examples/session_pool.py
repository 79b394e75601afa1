import asyncio

from pyrepl3_kernel.session.pool import PoolConfig, SessionPool


async def main():
    # Configure pool
    config = PoolConfig(min_idle=2, max_sessions=10, warmup_code="import numpy as np")

    # Create and use pool
    pool = SessionPool(config)
    await pool.start()

    session = await pool.acquire()
    # Use session...
    await pool.release(session)

    await pool.stop()


asyncio.run(main())
