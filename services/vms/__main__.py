"""python -m services.vms"""

from services.common import telemetry
from services.common.server import serve_until_signalled
from services.common.startup import configure_logging, run_main
from services.vms import bootstrap, config


def main() -> int:
    settings = config.load()
    configure_logging(settings.shared.log_level)
    telemetry.setup_tracing("blixard-vms", settings.shared.traces)
    running = bootstrap.build(settings)
    serve_until_signalled(running, settings.server.grace_seconds, banner="VM service")
    return 0


if __name__ == "__main__":
    run_main("blixard-vms", main)
