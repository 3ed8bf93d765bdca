"""GoldenHour dispatch: hospital registry, road routing, destination engine, MQTT service and HTTP API."""

from dispatch.api import build_service, create_app
from dispatch.destination import (
    Recommendation,
    TraumaVitals,
    departments_for,
    priority_for,
    rank_destinations,
    trauma_red_criteria,
)
from dispatch.errors import (
    DispatchError,
    NoRouteError,
    OutsideNetworkError,
    RegistryError,
    RoutingError,
    UnknownHospitalError,
)
from dispatch.hospitals import Capabilities, Hospital, HospitalRegistry, HospitalSnapshot, HospitalStatus
from dispatch.routing import RoadRouter, Route
from dispatch.security import DispatchSecurity
from dispatch.service import DispatchService
from dispatch.settings import DispatchSettings

__all__ = [
    "Capabilities",
    "DispatchError",
    "DispatchSecurity",
    "DispatchService",
    "DispatchSettings",
    "Hospital",
    "HospitalRegistry",
    "HospitalSnapshot",
    "HospitalStatus",
    "NoRouteError",
    "OutsideNetworkError",
    "Recommendation",
    "RegistryError",
    "RoadRouter",
    "Route",
    "RoutingError",
    "TraumaVitals",
    "UnknownHospitalError",
    "build_service",
    "create_app",
    "departments_for",
    "priority_for",
    "rank_destinations",
    "trauma_red_criteria",
]
