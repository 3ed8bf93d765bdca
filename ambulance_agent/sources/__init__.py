"""Acquisition sources of the in-vehicle agent: async iterators of typed readings behind one protocol."""

from ambulance_agent.sources.base import (
    Clock,
    EcgBlock,
    EcgSource,
    GpsReading,
    GpsSource,
    Pacer,
    Source,
    VitalsReading,
    VitalsSource,
)
from ambulance_agent.sources.ecg import WfdbEcgReplay
from ambulance_agent.sources.ecg_stream import RawEcgStreamSource
from ambulance_agent.sources.gps import RouteGpsReplay, haversine_m
from ambulance_agent.sources.vitals import NumericsVitalsReplay

__all__ = [
    "Clock",
    "EcgBlock",
    "EcgSource",
    "GpsReading",
    "GpsSource",
    "NumericsVitalsReplay",
    "Pacer",
    "RawEcgStreamSource",
    "RouteGpsReplay",
    "Source",
    "VitalsReading",
    "VitalsSource",
    "WfdbEcgReplay",
    "haversine_m",
]
