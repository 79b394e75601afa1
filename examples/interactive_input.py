import asyncio
import time

from pyrepl3_kernel.protocol.messages import ExecuteMessage, MessageType
from pyrepl3_kernel.session.manager import Session


async def main():
    session = Session()
    await session.start()

    # Code that uses input()
    code = """
name = input("What's your name? ")
age = input("How old are you? ")
print(f"Hello {name}, {age} years old!")
"""

    message = ExecuteMessage(id="interactive-1", timestamp=time.time(), code=code)

    # Execute and handle input requests
    async for msg in session.execute(message):
        if msg.type == MessageType.INPUT:
            # Respond to input request
            user_input = "Alice" if "name" in msg.prompt else "30"
            await session.input_response(msg.id, user_input)
        elif msg.type == MessageType.OUTPUT:
            print(msg.data, end="")

    await session.shutdown()


asyncio.run(main())
