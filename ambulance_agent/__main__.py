"""``python -m ambulance_agent``: run the in-vehicle agent from ``EMS_AGENT_*`` / ``EMS_MQTT_*`` settings.

Exit codes: 0 after SIGTERM/SIGINT (the retained ``offline`` death is published first), 2 for invalid settings,
3 when the broker refuses the credentials, 4 when the outbox cannot be opened (e.g. sealed with a key the unit does
not hold: nothing is deleted; configure the key and start again).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from ambulance_agent.main import build, serve
from ambulance_agent.outbox import OutboxError
from ambulance_agent.settings import AgentSettings
from broker_config.connection import AuthError

logger = logging.getLogger("ambulance_agent")


def main() -> int:
    """Load the settings, run the agent until a signal; return the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = AgentSettings()  # type: ignore[call-arg,unused-ignore]  # from the environment
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "(settings)" for e in exc.errors()})
        logger.error("invalid agent settings (EMS_AGENT_*): %s", ", ".join(fields))
        for error in exc.errors():
            logger.error("  %s: %s", ".".join(str(p) for p in error["loc"]), error["msg"])
        return 2
    logging.getLogger().setLevel(settings.log_level)
    refused = False
    try:
        built = build(settings)
    except OutboxError as exc:
        logger.error("%s", exc)
        return 4
    try:
        asyncio.run(serve(built))
    except* AuthError:
        logger.error("the broker refused the unit's credentials")
        refused = True
    return 3 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
