"""Keeping the garbage collector off the objects a process builds at start-up."""

import gc


def freeze_startup_objects() -> None:
    """Move every object built so far out of the garbage collector's reach.

    The imported modules, settings and app live as long as the process. Left in the collector's
    generations, they made each full collection take about 30 ms for the 100,000 objects of a
    service (measured on a 2-vCPU VM, Python 3.11). Each such collection stalled every request
    and event in flight, which added to the tail latency of the router and the sync path.
    """
    gc.collect()
    gc.freeze()
