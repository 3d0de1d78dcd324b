"""What the jobs outbox says to the queue: "enqueue" and "cancel" messages, delivered by the
shared relay. Enqueue is idempotent by (job id, generation), so a redelivery is harmless."""

from __future__ import annotations

from typing import Protocol

from services.common import telemetry
from services.common.outbox import Message
from services.jobs.domain import Job
from services.jobs.store import JobStore


class QueuePort(Protocol):
    def enqueue(self, job: Job) -> None: ...

    def cancel(self, job_id: str, generation: int) -> None: ...


class QueueDelivery:
    def __init__(self, store: JobStore, queue: QueuePort) -> None:
        self.store = store
        self.queue = queue
        self._tracer = telemetry.tracer(__name__)

    def __call__(self, message: Message) -> None:
        job_id, generation = message.payload["job_id"], message.payload["generation"]
        if message.topic == "cancel":
            self.queue.cancel(job_id, generation)
            return
        job = self.store.get(job_id)
        if job is None or job.generation != generation or job.state.terminal:
            return  # superseded by a newer generation, or cancelled before it was sent
        with self._tracer.start_as_current_span(
            "outbox.enqueue",
            context=telemetry.context_from(job.trace_context),
            attributes={"blixard.job_id": job_id, "blixard.generation": generation},
        ):
            self.queue.enqueue(job)
