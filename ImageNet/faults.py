"""Test hooks that stop or kill the process at a chosen point of a training run.

The tests of "what survives what" need faults that land at a known place: after a given
training step, or in the middle of writing a checkpoint. A ``kill -9`` from outside at
a random moment proves less and makes flaky tests, so the process either kills itself
with SIGKILL (which no Python code can catch or clean up after, exactly as ``kill -9``)
or stops itself with SIGSTOP, so that the test can act on the frozen process (send it
SIGKILL, make its output directory unwritable, ...) and then continue or end it.

``BNEXT_TEST_FAULT=ACTION@POINT:N`` selects the fault; ACTION is ``kill`` or ``stop``:

- ``POINT=step``: after global step N (after its checkpoint, if one was due);
- ``POINT=save``: inside the N-th checkpoint write of this process, when the temporary
  file is complete and before it is renamed over the checkpoint.

``BNEXT_TEST_FAULT_RANK`` (default 0) picks the process. The hook fires only in the
first attempt of a torchrun job (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so that a
restarted group runs to the end. When the variable is unset the hooks cost a dictionary
lookup.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "BNEXT_TEST_FAULT"
_SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def parse(spec: str) -> tuple[str, str, int]:
    """``"kill@step:5"`` -> ``("kill", "step", 5)``; a malformed value raises ValueError naming the variable."""
    action, _, rest = spec.partition("@")
    point, _, count = rest.partition(":")
    if action not in _SIGNALS or point not in ("step", "save") or not count.isdigit():
        raise ValueError(f"{ENV}={spec!r} is not ACTION@POINT:N with ACTION kill|stop and POINT step|save")
    return action, point, int(count)


def fault_point(point: str, count: int) -> None:
    """Kill or stop this process when ``BNEXT_TEST_FAULT`` names ``point`` and ``count`` (see the module)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, wanted_point, wanted_count = parse(spec)
    if (wanted_point, wanted_count) != (point, count):
        return
    if int(os.environ.get("RANK", "0")) != int(os.environ.get(f"{ENV}_RANK", "0")):
        return
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) != 0:
        return
    print(f"{ENV}={spec}: sending {action} to process {os.getpid()}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), _SIGNALS[action])
