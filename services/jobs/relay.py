"""What the jobs outbox says to the queue: "enqueue" and "cancel" messages, delivered by the
shared relay. Enqueue is idempotent by (job id, generation), so a redelivery is harmless;
so is a cancel's (CancelJob may have told the queue already), and a cancel that reaches the
queue before its enqueue (another jobs replica's relay sending it late) still wins there."""

from __future__ import annotations

from typing import Protocol

from services.common import telemetry
from services.common.outbox import Message
from services.jobs.domain import Job
from services.jobs.store import JobStore


class QueuePort(Protocol):
    def enqueue(self, job: Job) -> None: ...

    def enqueue_many(self, jobs: list[Job]) -> list[Exception | None]: ...

    def cancel(self, job_id: str, generation: int, timeout: float = ...) -> None: ...


class QueueDelivery:
    def __init__(self, store: JobStore, queue: QueuePort) -> None:
        self.store = store
        self.queue = queue
        self._tracer = telemetry.tracer(__name__)

    def __call__(self, message: Message) -> None:
        [outcome] = self.many([message])
        if outcome is not None:
            raise outcome

    def many(self, messages: list[Message]) -> list[Exception | None]:
        """The relay's batch: runs of "enqueue" messages go in one BatchEnqueue; a "cancel"
        goes on its own, after the enqueues before it. None for each message delivered
        (or no longer worth sending), else why not; nothing after a failure is sent."""
        outcomes: list[Exception | None] = []
        pending: list[tuple[Message, Job]] = []
        # The page's jobs in one read (a job changed after it is sent anew by its own message).
        jobs = self.store.get_many([m.payload["job_id"] for m in messages if m.topic != "cancel"])

        def flush() -> bool:
            results = self._enqueue([job for _, job in pending])
            outcomes.extend(results)
            pending.clear()
            return all(result is None for result in results)

        for message in messages:
            job_id, generation = message.payload["job_id"], message.payload["generation"]
            if message.topic == "cancel":
                if pending and not flush():
                    break
                try:
                    self.queue.cancel(job_id, generation)
                except Exception as exc:
                    outcomes.append(exc)
                    break
                outcomes.append(None)
                continue
            job = jobs.get(job_id)
            if job is None or job.generation != generation or job.state.terminal:
                if pending and not flush():
                    break
                outcomes.append(None)  # superseded, or cancelled before it was sent
                continue
            pending.append((message, job))
        else:
            if pending:
                flush()
        return outcomes + [RuntimeError("not sent")] * (len(messages) - len(outcomes))

    def _enqueue(self, jobs: list[Job]) -> list[Exception | None]:
        # Each job's trace shows its enqueue, for the one call that sends them all.
        carriers = (
            (
                job.trace_context,
                {"blixard.job_id": job.job_id, "blixard.generation": job.generation},
            )
            for job in jobs
        )
        with telemetry.span_per_item(self._tracer, "outbox.enqueue", carriers):
            try:
                return self.queue.enqueue_many(jobs)
            except Exception as exc:  # the call failed: the first waits, the rest with it
                return [exc] * len(jobs)
