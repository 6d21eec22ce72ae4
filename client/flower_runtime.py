"""The node's seam to Flower's non-public ClientApp runtime.

Why Flower's public API does not suffice: `flwr.clientapp.ClientApp` is public,
but the loop that feeds it (take a task from the SuperNode, pull its message,
context and app bundle, push the reply) exists only inside `flwr-clientapp`,
which installs and imports the run's bundle before anything could check it.
The node runs that loop itself so that it can refuse a foreign bundle and call
only the installed ClientApp; this module holds every non-public piece of it
(the parts shared with the coordinator are in `protocol/flower_runtime.py`).
`tests/test_flower_contract.py` pins them.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from loracommons.protocol.flower_runtime import AppBundle, TaskSession, safe_retry_invoker

if TYPE_CHECKING:
    from flwr.app import Context, Message


class ClientTask(TaskSession):
    """One ClientApp task on the local SuperNode's Runtime API, opened with its token."""

    def __init__(self, address: str, token: str, stop: threading.Event):
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.protobuf.client import ProtobufClientInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[ProtobufClientInterceptor] = [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token)]
        super().__init__(RuntimeHttpClient.from_server_address(
            server_address=address, insecure=True, root_certificates=None, interceptors=interceptors,
            retry_invoker=safe_retry_invoker(max_time=30.0, stop=stop)))

    def pull(self) -> tuple[Message, Context, AppBundle]:
        """The task's message, its context (pushed back at the end) and its run's app bundle."""
        from flwr.supernode.runtime.run_clientapp import pull_task_input

        message, context, run, fab = pull_task_input(self.client)
        self.context = context
        return message, context, AppBundle.of(run, fab)

    def reply(self, message: Message) -> None:
        from flwr.supernode.runtime.run_clientapp import push_message

        assert self.context is not None, "reply before pull"
        push_message(self.client, message, self.context)


def refusal(message: Message, reason: str) -> Message:
    """The error reply to a task whose app bundle is not the installed app."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.INVALID_FAB, reason=reason[:500]), reply_to=message)


def failure(message: Message, reason: str) -> Message:
    """The error reply to a task the installed ClientApp raised on."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason[:500]), reply_to=message)


def run_supernode() -> None:
    """Flower's `flower-supernode` command line, unchanged but for its paced waits
    (`protocol.flower_timing`): the node's SuperNode runs through this."""
    import sys

    from flwr.supernode.cli import flower_supernode

    from loracommons.protocol.flower_timing import pace_supernode

    pace_supernode()
    sys.argv[0] = "flower-supernode"  # Flower's own usage and error lines
    flower_supernode()
