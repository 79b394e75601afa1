import asyncio

from pyrepl3_kernel.protocol.messages import ExecuteMessage
from pyrepl3_kernel.session.manager import Session


async def main():
    # Create and start a session
    session = Session()
    await session.start()

    # Execute code
    message = ExecuteMessage(id="exec-1", timestamp=0, code="print('Hello from subprocess!')")

    async for msg in session.execute(message):
        if msg.type == "output":
            print(msg.data)

    await session.shutdown()


asyncio.run(main())
