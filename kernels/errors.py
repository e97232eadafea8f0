"""The one base class of the errors qshard raises on purpose (bad input, checkpoints it cannot run,
failed ranks), so that a front end can print them as one line and treat anything else as a bug.

It lives at the bottom of the import graph (launch → engine → quant → parallel → kernels) because
every layer raises such errors.
"""

from __future__ import annotations


class QShardError(Exception):
    """An error whose message alone tells the user what is wrong: it names the field, tensor,
    file or value, and the CLI prints it as `error: <message>` without a traceback."""


class InputError(QShardError, ValueError):
    """A request, argument or option is invalid (empty prompt, bad sampling parameter, a device
    that is not there, an output path that would destroy data)."""
