"""python -m services.jobs"""

from services.common import telemetry
from services.common.server import serve_until_signalled
from services.common.startup import configure_logging, run_main
from services.jobs import bootstrap, config


def main() -> int:
    settings = config.load()
    configure_logging(settings.shared.log_level)
    telemetry.setup_tracing("blixard-jobs", settings.shared.traces)
    running = bootstrap.build(settings)
    serve_until_signalled(running, settings.server.grace_seconds, banner="jobs service")
    return 0


if __name__ == "__main__":
    run_main("blixard-jobs", main)
