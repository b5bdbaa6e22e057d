"""cancel_and_wait: every task given is cancelled and has ended when it returns."""

from __future__ import annotations

import asyncio

from ccx_proxy.tasks import cancel_and_wait


async def test_cancels_every_task_and_waits_for_each_to_end() -> None:
    cleaned: list[int] = []

    async def loop(n: int) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # its cleanup takes a turn of its own
            cleaned.append(n)

    tasks = [asyncio.create_task(loop(n)) for n in range(3)]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks[0], None, *tasks[1:])
    assert all(t.cancelled() for t in tasks) and sorted(cleaned) == [0, 1, 2]
    await cancel_and_wait()  # nothing to stop
    await cancel_and_wait(*tasks)  # already ended: nothing happens
