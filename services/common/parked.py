"""The edge of the parked-message RPCs, the same on each service with an outbox
(ListParkedMessages, RedriveParkedMessage, DeleteParkedMessage): their checks, and the one
conversion of a parked message to its contract (blixard.common.v1.ParkedMessage)."""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from blixard.common.v1 import outbox_pb2

from services.common import paging, pbtime
from services.common.outbox import ParkedMessage, ParkedMessages
from services.common.validation import Problems

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_ID = 2**63 - 1


class PageRequest(Protocol):
    @property
    def page_size(self) -> int: ...

    @property
    def page_token(self) -> str: ...


def check_page(request: PageRequest, problems: Problems) -> tuple[int, int]:
    """The page size and the id the page starts after."""
    problems.check(
        0 <= request.page_size <= MAX_PAGE_SIZE, "page_size", f"between 0 and {MAX_PAGE_SIZE}"
    )
    after = 0
    position = paging.decode(request.page_token, 1, problems)
    if position is not None:
        # Only the ids this service gave out: digits of a bigint (a longer number would
        # reach the database out of its column's range).
        if position[0].isdigit() and len(position[0]) <= 19 and int(position[0]) <= MAX_ID:
            after = int(position[0])
        else:
            paging.not_ours(problems)
    return request.page_size or DEFAULT_PAGE_SIZE, after


def check_id(message_id: int, problems: Problems) -> None:
    problems.check(1 <= message_id <= MAX_ID, "id", "required: a parked message's id")


def page_token(after: int) -> str:
    return paging.encode(str(after)) if after else ""


def message(parked: ParkedMessage) -> outbox_pb2.ParkedMessage:
    return outbox_pb2.ParkedMessage(
        id=parked.id,
        topic=parked.topic,
        key=parked.key,
        payload=parked.payload,
        attempts=parked.attempts,
        last_error=parked.last_error,
        create_time=pbtime.timestamp(parked.created_at),
        park_time=pbtime.timestamp(parked.parked_at),
    )


class ParkedRpcs:
    """The three RPCs themselves, for a servicer to mix in (before its generated base):
    it names its contract module (``parked_contract``, where its request and response
    messages are) and its outbox's parked messages (``parked_messages``)."""

    parked_contract: Any
    parked_messages: ParkedMessages

    def ListParkedMessages(self, request: Any, context: grpc.ServicerContext) -> Any:
        problems = Problems()
        page_size, after = check_page(request, problems)
        problems.raise_if_any()
        found, last, total = self.parked_messages.page(page_size, after)
        return self.parked_contract.ListParkedMessagesResponse(
            messages=[message(p) for p in found],
            next_page_token=page_token(last),
            total_parked=total,
        )

    def RedriveParkedMessage(self, request: Any, context: grpc.ServicerContext) -> Any:
        problems = Problems()
        check_id(request.id, problems)
        problems.raise_if_any()
        redriven = self.parked_messages.redrive(request.id)
        return self.parked_contract.RedriveParkedMessageResponse(message=message(redriven))

    def DeleteParkedMessage(self, request: Any, context: grpc.ServicerContext) -> Any:
        problems = Problems()
        check_id(request.id, problems)
        problems.raise_if_any()
        deleted = self.parked_messages.delete(request.id)
        return self.parked_contract.DeleteParkedMessageResponse(message=message(deleted))
