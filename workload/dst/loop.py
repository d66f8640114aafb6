"""A virtual-time asyncio event loop, and the simulated nodes that share it.

`VirtualLoop` is a real asyncio event loop (asyncio.BaseEventLoop: the same
ready queue, timer heap and task machinery as the stock loop) whose clock is
virtual: when no callback is ready it jumps straight to the next timer
instead of sleeping, so a simulated minute of lease terms and ack timeouts
costs only the callbacks it runs.  It does no I/O at all and runs no
threads (`run_in_executor` raises): the simulator's transports are in
memory (workload/dst/net.py), and the daemon runs its blocking backend calls
inline (`HostDaemon(run_blocking=...)`).  Nothing in it reads a wall clock,
so a run depends only on its seed.

Nodes: the host and each guest run as a `Node`, i.e. in their own
contextvars context.  Every callback and timer is tagged with the node it
was scheduled from (asyncio copies the context into every task and handle),
which gives each node:

* its own clock: `loop.time()` (and so every `call_later`, `sleep`,
  `wait_for` of that node) and `Node.clock()` read the node's local time,
  running at the node's `rate` (seeded, within the documented clock margin,
  host/leases.py CLOCK_RATE_MARGIN);
* pauses: while paused, none of its callbacks or timers run (they are held,
  in order, and run when it resumes); with `clock_stops` its clock stands
  still meanwhile and its timers are pushed back by the pause, as in a
  stopped VM whose clock is stopped with it;
* death: a killed node never runs anything again.

Code outside any node (the simulation's driver) sees global virtual time.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import heapq
import threading

CURRENT: contextvars.ContextVar["Node | None"] = contextvars.ContextVar("dst_node", default=None)


class Idle(RuntimeError):
    """Nothing is ready and no timer is set, but the awaited work is not done:
    the simulation deadlocked."""


class Node:
    """One simulated machine's view of the loop: a clock, pauses, death."""

    def __init__(self, loop: "VirtualLoop", name: str, rate: float = 1.0, offset: float = 0.0):
        self.loop = loop
        self.name = name
        self.rate = rate
        # local = _base_local + (global - _base_global) * rate, while the clock runs
        self._base_local = offset
        self._base_global = loop.now
        self.paused = False
        self.clock_stopped = False
        self._paused_at = 0.0
        self.dead = False
        self.held: list[tuple] = []  # callbacks and timers that came due while paused
        self.timers: list[asyncio.TimerHandle] = []
        self.context = contextvars.Context()
        self.context.run(CURRENT.set, self)

    def local(self, global_time: float) -> float:
        if self.clock_stopped:
            return self._base_local
        return self._base_local + (global_time - self._base_global) * self.rate

    def to_global(self, local_time: float) -> float:
        base_global = self.loop.now if self.clock_stopped else self._base_global
        return base_global + (local_time - self._base_local) / self.rate

    def local_due(self, global_time: float) -> float:
        """The inverse of `to_global`: the local instant a global deadline stands for."""
        base_global = self.loop.now if self.clock_stopped else self._base_global
        return self._base_local + (global_time - base_global) * self.rate

    def clock(self) -> float:
        """This node's monotonic clock, in seconds."""
        return self.local(self.loop.now)

    def spawn(self, coro) -> asyncio.Task:
        """Run `coro` as a task of this node."""
        return self.loop.create_task(coro, context=self.context)

    def call_soon(self, callback, *args) -> asyncio.Handle:
        return self.loop.call_soon(callback, *args, context=self.context)

    def pause(self, clock_stops: bool = False) -> None:
        if self.paused or self.dead:
            return
        self.paused = True
        self._paused_at = self.loop.now
        if clock_stops:
            self._base_local = self.clock()
            self.clock_stopped = True

    def resume(self) -> None:
        if not self.paused or self.dead:
            return
        self.paused = False
        if self.clock_stopped:
            # The local clock resumes where it stopped; every timer of this node
            # is due that much later in global time.
            shift = self.loop.now - self._paused_at
            self._base_global = self.loop.now
            self.loop._shift_timers(self, shift)
        stopped, self.clock_stopped = self.clock_stopped, False
        held, self.held = self.held, []
        for entry in held:
            if entry[0] == "timer":
                _, context, cell, local_due, callback, args = entry
                if cell[0]._cancelled:
                    continue
                # A timer that came due while the node was paused: with its clock
                # stopped it is not due yet on the node's clock; else it is overdue.
                when = self.to_global(local_due) if stopped else self.loop.now
                self.loop._schedule_timer(self, context, cell, local_due, callback, args, when)
            else:
                _, context, callback, args = entry
                self.loop.call_soon(callback, *args, context=context)

    def kill(self) -> None:
        self.dead = True
        self.held.clear()


class _Selector:
    """The loop's selector: nothing to select, time jumps to the next timer."""

    def __init__(self, loop: "VirtualLoop"):
        self._loop = loop

    def select(self, timeout):
        loop = self._loop
        if timeout is None:
            loop.idle = True
            return []
        if timeout > 0 and loop._scheduled:
            loop.now = max(loop.now, loop._scheduled[0]._when)
        return []

    def close(self):
        pass


class VirtualLoop(asyncio.BaseEventLoop):
    """An asyncio loop on virtual time; see the module docstring."""

    def __init__(self):
        super().__init__()
        self.now = 0.0
        self.idle = False
        self._selector = _Selector(self)
        self._clock_resolution = 1e-9
        self.callbacks_run = 0

    # --- time --------------------------------------------------------------------

    def time(self) -> float:
        node = CURRENT.get()
        return self.now if node is None else node.local(self.now)

    def _shift_timers(self, node: Node, shift: float) -> None:
        live = [h for h in node.timers if h._scheduled and not h._cancelled]
        node.timers = live
        for handle in live:
            handle._when += shift
        heapq.heapify(self._scheduled)

    # --- scheduling, gated by node -------------------------------------------------

    def call_soon(self, callback, *args, context=None):
        if self._closed:
            return None  # a killed node's coroutine, closed as garbage after the run: drop
        if context is None:
            context = contextvars.copy_context()
        node = context.get(CURRENT)
        if node is not None:
            callback = functools.partial(self._gated, node, context, callback)
        return super().call_soon(callback, *args, context=context)

    def call_at(self, when, callback, *args, context=None):
        if self._closed:
            return None
        caller = CURRENT.get()
        if caller is not None:
            when = caller.to_global(when)  # `when` is on the caller's clock
        if context is None:
            context = contextvars.copy_context()
        node = context.get(CURRENT)
        if node is None:
            return super().call_at(when, callback, *args, context=context)
        return self._schedule_timer(node, context, [], node.local_due(when), callback, args, when)

    def _schedule_timer(self, node, context, cell, local_due, callback, args, when):
        gated = functools.partial(self._gated_timer, node, context, cell, local_due, callback)
        handle = super().call_at(when, gated, *args, context=context)
        if not cell:
            cell.append(handle)  # the caller's handle: its cancel() counts for every re-arm
        node.timers.append(handle)
        if len(node.timers) > 256:
            node.timers = [h for h in node.timers if h._scheduled and not h._cancelled]
        return handle

    def call_later(self, delay, callback, *args, context=None):
        return self.call_at(self.time() + delay, callback, *args, context=context)

    def call_global_at(self, when: float, callback, *args, context=None):
        """`call_at` on global virtual time (the network's deliveries)."""
        caller_token = CURRENT.set(None)
        try:
            return self.call_at(when, callback, *args, context=context)
        finally:
            CURRENT.reset(caller_token)

    def _gated(self, node: Node, context, callback, *args):
        if node.dead:
            return
        if node.paused:
            node.held.append(("soon", context, callback, args))
            return
        self.callbacks_run += 1
        callback(*args)

    def _gated_timer(self, node: Node, context, cell, local_due, callback, *args):
        if node.dead or cell[0]._cancelled:
            return
        if node.paused:
            node.held.append(("timer", context, cell, local_due, callback, args))
            return
        self.callbacks_run += 1
        callback(*args)

    # --- what a simulation must not do -----------------------------------------------

    def run_in_executor(self, executor, func, *args):
        raise RuntimeError(f"the simulator runs no threads, but {func!r} was sent to one: "
                           f"give the piece an inline seam (e.g. HostDaemon(run_blocking=...))")

    def call_soon_threadsafe(self, callback, *args, context=None):
        raise RuntimeError("the simulator runs no threads (call_soon_threadsafe)")

    def _process_events(self, event_list):
        pass

    def _write_to_self(self):
        pass

    def run_until(self, future_or_coro, limit: float | None = None):
        """run_until_complete, raising Idle if the loop goes idle before `future_or_coro`
        is done (a deadlock), or once global time passes `limit`."""
        future = asyncio.ensure_future(future_or_coro, loop=self)
        done = []
        future.add_done_callback(lambda _: done.append(True))
        self._check_closed()
        self._thread_id = threading.get_ident()
        asyncio.events._set_running_loop(self)
        try:
            while not done:
                self.idle = False
                self._run_once()
                if self.idle and not self._ready and not done:
                    raise Idle(f"the simulation went idle at t={self.now:.6f}s with its "
                               f"driver still waiting")
                if limit is not None and self.now > limit:
                    raise Idle(f"virtual time passed {limit}s")
        finally:
            self._thread_id = None
            asyncio.events._set_running_loop(None)
        return future.result()
