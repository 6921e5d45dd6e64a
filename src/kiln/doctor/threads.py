"""Thread oversubscription: more runnable threads than cores, with torch's default thread count.

Torch starts one intra-op thread per core. On a host where other processes already keep cores
busy, those threads no longer get a core each: every parallel op waits for its slowest thread,
which sits in the run queue behind another process, and a step can take tens of times longer
than with fewer threads (40-80x was measured on a shared two-core machine). Nothing fails, so
it goes unnoticed. :func:`host_load` reads the facts (cores, torch threads, the 1-minute load
average, the threads runnable right now) and :func:`thread_findings` turns them into a finding
with the thread count to use; both ``kiln doctor`` and ``kiln profile`` report it.

Example:
    >>> busy = HostLoad(cpus=2, threads=2, load1=7.0, runnable=8)
    >>> [f.code for f in thread_findings(busy)], suggested_threads(busy)
    (['threads-oversubscribed'], 1)
    >>> thread_findings(HostLoad(cpus=16, threads=16, load1=0.4, runnable=1))
    []
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

from kiln.doctor.findings import Finding, finding

__all__ = [
    "HostLoad",
    "host_load",
    "oversubscribed",
    "oversubscription_note",
    "suggested_threads",
    "thread_findings",
]


@dataclass(frozen=True)
class HostLoad:
    """What decides whether torch's intra-op threads find free cores.

    Attributes:
        cpus: cores this process may run on (its affinity mask).
        threads: torch's intra-op threads (``torch.get_num_threads()``).
        load1: the 1-minute load average (``os.getloadavg()[0]``), None where unknown.
        runnable: threads running or runnable right now, the reading one included (the 4th
            field of ``/proc/loadavg``, before the slash), None where unknown.
    """

    cpus: int
    threads: int
    load1: float | None = None
    runnable: int | None = None

    @property
    def others(self) -> float:
        """Cores kept busy by other work: the larger of the load average and the run queue,
        less the one thread of this process that is reading them."""
        seen = [v - 1 for v in (self.load1, self.runnable) if v is not None]
        return max([0.0, *seen])


def host_load() -> HostLoad:
    """The load of this host now (``/proc/loadavg``, ``os.getloadavg``) and torch's threads.

    Example:
        >>> host_load().cpus >= 1
        True
    """
    import torch

    from kiln.perf.measure import cpu_cores

    load1: float | None = None
    runnable: int | None = None
    with contextlib.suppress(OSError):
        load1 = os.getloadavg()[0]
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/loadavg") as f:
        runnable = int(f.read().split()[3].split("/")[0])
    return HostLoad(cpu_cores(), torch.get_num_threads(), load1, runnable)


def suggested_threads(host: HostLoad) -> int:
    """The intra-op threads that fit beside the other work: the cores it leaves free, >= 1.

    Example:
        >>> suggested_threads(HostLoad(cpus=16, threads=16, load1=4.2, runnable=3))
        12
    """
    return max(1, host.cpus - math.ceil(host.others))


def oversubscribed(host: HostLoad) -> bool:
    """More torch threads (two or more) than cores, or than the cores other work leaves free.

    Other work counts from one whole busy core up: a load average of 0.4 is noise.

    Example:
        >>> oversubscribed(HostLoad(cpus=4, threads=4, load1=1.5, runnable=2))
        True
        >>> oversubscribed(HostLoad(cpus=4, threads=8))
        True
    """
    if host.threads < 2:
        return False
    others = host.others if host.others >= 1 else 0.0
    return host.threads + others > host.cpus


def thread_findings(host: HostLoad, cost: str | None = None) -> list[Finding]:
    """A ``threads-oversubscribed`` finding when torch's threads do not fit beside the load.

    Args:
        host: the facts (:func:`host_load` reads them; tests pass their own).
        cost: what the doctor measured with the suggested thread count, if it did.

    Example:
        >>> print(thread_findings(HostLoad(cpus=2, threads=2, load1=6.0, runnable=7))[0].where)
        torch.get_num_threads()=2 on 2 cores; load average 6.00, 7 threads runnable
    """
    if not oversubscribed(host):
        return []
    k = suggested_threads(host)
    share = f"{host.threads} torch threads share {host.cpus} cores"
    if host.others >= 1:
        share += f" with about {host.others:.0f} busy threads of other work"
    what = f"{share}: torch.set_num_threads({k}) (or OMP_NUM_THREADS={k}) fits"
    facts = [f"load average {host.load1:.2f}" if host.load1 is not None else None]
    facts.append(f"{host.runnable} threads runnable" if host.runnable is not None else None)
    where = f"torch.get_num_threads()={host.threads} on {host.cpus} cores"
    shown = [x for x in facts if x]
    where += f"; {', '.join(shown)}" if shown else ""
    return [finding("threads-oversubscribed", what, where, cost)]


def oversubscription_note(host: HostLoad) -> str | None:
    """One line for tools that print notes (``kiln profile``), or None on a host with room.

    Example:
        >>> oversubscription_note(HostLoad(cpus=2, threads=2, load1=7.0, runnable=8))[:40]
        'threads oversubscribed: 2 torch threads '
    """
    found = thread_findings(host)
    if not found:
        return None
    return (
        f"threads oversubscribed: {found[0].what} ({found[0].where}); timings on this host are "
        "slower than the model's own cost"
    )
