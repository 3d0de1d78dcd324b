"""python -m services.worker"""

import signal
from typing import Any

from services.common import telemetry
from services.common.startup import configure_logging, run_main
from services.worker import bootstrap, config


def main() -> int:
    settings = config.load()
    configure_logging(settings.shared.log_level)
    telemetry.setup_tracing("blixard-worker", settings.shared.traces)
    worker = bootstrap.from_environment(settings)

    def on_signal(_signum: int, _frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run()
    return 0


if __name__ == "__main__":
    run_main("blixard-worker", main)
