"""A native session survives the death of its worker: the cell that killed
it gets an error naming the cause, a new worker comes up with the state of
the last successful cell, and the session goes on."""

import asyncio

from pyrepl3_kernel import ExecuteMessage, Session


async def run(session: Session, code: str) -> None:
    async for msg in session.execute(ExecuteMessage(code=code)):
        if msg.type == "output":
            print(msg.data, end="")
        elif msg.type == "result":
            print(msg.data["text/plain"])
        elif msg.type == "error":
            print(f"{msg.ename}: {msg.evalue}")


async def main() -> None:
    async with Session(memory_limit="1G") as session:
        await run(session, "data = {'answer': 42}")
        await run(session, "import os\nos._exit(3)")  # the worker dies
        await run(session, "data['answer']")  # the state came back
        print(f"restarts: {session.restarts}, last crash: {session.last_crash}")


asyncio.run(main())
