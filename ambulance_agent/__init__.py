"""GoldenHour's in-vehicle agent: acquisition sources, heart rate from ECG, durable outbox, MQTT uplink."""

from ambulance_agent.app import Agent, LinkHealth
from ambulance_agent.heart_rate import HeartRateEstimator, HeartRateResult, heart_rate_from_ecg
from ambulance_agent.outbox import Outbox, OutboxMessage, OutboxStats
from ambulance_agent.sources import (
    EcgBlock,
    EcgSource,
    GpsReading,
    GpsSource,
    NumericsVitalsReplay,
    RouteGpsReplay,
    VitalsReading,
    VitalsSource,
    WfdbEcgReplay,
)

__all__ = [
    "Agent",
    "EcgBlock",
    "EcgSource",
    "GpsReading",
    "GpsSource",
    "HeartRateEstimator",
    "HeartRateResult",
    "LinkHealth",
    "NumericsVitalsReplay",
    "Outbox",
    "OutboxMessage",
    "OutboxStats",
    "RouteGpsReplay",
    "VitalsReading",
    "VitalsSource",
    "WfdbEcgReplay",
    "heart_rate_from_ecg",
]
