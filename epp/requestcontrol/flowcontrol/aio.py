"""Asyncio waiting on top of the flow controller (the controller itself is clock-driven).

`wait(ticket)` parks the calling task until the ticket is dispatched or rejected. While any
ticket waits, a periodic tick pumps its controller, so queued requests also move when
scraped load drops or a request's time in the queue runs out; events (a prefill finished,
a request ended) pump at once through the lifecycle hook. A task cancelled while it waits
(the client went away) takes its ticket out of the queue, or releases the endpoint the
ticket was dispatched to in the meantime, so nothing leaks.
"""

from __future__ import annotations

import asyncio

from epp.requestcontrol.decision import Decision
from epp.requestcontrol.flowcontrol.controller import FlowController
from epp.requestcontrol.flowcontrol.queue import Ticket, TicketState

DEFAULT_TICK_S = 0.01


class AsyncFlowWaiter:
    def __init__(self, tick_s: float = DEFAULT_TICK_S) -> None:
        self.tick_s = tick_s
        self._controllers: set[FlowController] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def wait(self, ticket: Ticket) -> Decision:
        """The ticket's decision once dispatched; raises its RequestError if rejected."""
        if ticket.state is TicketState.QUEUED:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()

            def done(_: Ticket) -> None:
                if not fut.done():
                    fut.set_result(None)

            ticket.on_done = done
            self._watch(ticket.controller, loop)
            try:
                await fut
            except asyncio.CancelledError:
                controller = ticket.controller
                if controller is not None:
                    controller.cancel(ticket)
                raise
            finally:
                ticket.on_done = None
        if ticket.error is not None:
            raise ticket.error
        if ticket.decision is None:  # cancelled by someone else
            raise asyncio.CancelledError()
        return ticket.decision

    def _watch(self, controller: FlowController, loop: asyncio.AbstractEventLoop) -> None:
        self._controllers.add(controller)
        if self._timer is None:
            self._timer = loop.call_later(self.tick_s, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        for c in list(self._controllers):
            self._controllers.discard(c)
            while c.successor is not None:  # replaced by a config reload
                c = c.successor
            c.pump()
            if c.queued:
                self._controllers.add(c)
        if self._controllers:
            self._timer = loop.call_later(self.tick_s, self._tick, loop)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
