"""Isthmus: an IoT telemetry gateway with a narrow waist.

Devices come in through sources, every frame is journaled durably before the device is
acknowledged, decoded into a :class:`~isthmus.message.Message`, mapped from the physical
device to the logical device it currently feeds, and delivered to any number of sinks.
"""

__version__ = "0.1.0"
