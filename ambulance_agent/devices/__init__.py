"""Device input adapters of the in-vehicle agent: patient monitors over HL7 v2 / MLLP and GNSS receivers over NMEA.

Each adapter turns untrusted device bytes into typed, contract-ready results (:class:`broker_config.Vitals`,
:class:`broker_config.GpsFix`).  Bad input is rejected with a counted, logged reason (identifiers only, never
values) and never stops the adapter.

* :mod:`~ambulance_agent.devices.hl7_message`: byte-safe HL7 v2 front end (terminators, FF-09) and ACKs.
* :mod:`~ambulance_agent.devices.hl7_monitor`: IHE PCD-01 numerics and PCD-04 alarms; the de-duplicating input.
* :mod:`~ambulance_agent.devices.mllp`: MLLP framing, listener and resending client (FF-08).
* :mod:`~ambulance_agent.devices.nmea_gps`: NMEA 0183 reader (FF-05, FF-06, FF-07).
"""

from ambulance_agent.devices.errors import DeviceInputError, RejectTally
from ambulance_agent.devices.hl7_message import (
    AckCode,
    Hl7InputError,
    Hl7Reason,
    build_ack,
    normalise_segments,
    parse_message,
    read_ack,
)
from ambulance_agent.devices.hl7_monitor import (
    AlarmReport,
    DeviceAlarm,
    Hl7MonitorInput,
    MonitorReport,
    VitalsGroup,
    read_alarm_report,
    read_monitor_report,
)
from ambulance_agent.devices.mllp import MllpAck, MllpListener, MllpNackError, MllpTimeoutError, send_mllp
from ambulance_agent.devices.nmea_gps import ClockStatus, NmeaFix, NmeaGpsReader, NmeaInputError, NmeaReason

__all__ = [
    # errors and counting
    "DeviceInputError",
    "RejectTally",
    # HL7 v2 / MLLP
    "AckCode",
    "AlarmReport",
    "DeviceAlarm",
    "Hl7InputError",
    "Hl7MonitorInput",
    "Hl7Reason",
    "MllpAck",
    "MllpListener",
    "MllpNackError",
    "MllpTimeoutError",
    "MonitorReport",
    "VitalsGroup",
    "build_ack",
    "normalise_segments",
    "parse_message",
    "read_ack",
    "read_alarm_report",
    "read_monitor_report",
    "send_mllp",
    # NMEA
    "ClockStatus",
    "NmeaFix",
    "NmeaGpsReader",
    "NmeaInputError",
    "NmeaReason",
]
