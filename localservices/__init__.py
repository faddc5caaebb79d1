"""Local development services: Kafka (KRaft), PostgreSQL, Mosquitto and InfluxDB started on this machine.

Not part of the runtime (no stage or connector imports it): ``plantstream services up|down|status``,
``make test`` and ``make bench`` use it. See :mod:`localservices.harness`.
"""
