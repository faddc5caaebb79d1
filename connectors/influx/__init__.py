"""InfluxDB sink (1.x HTTP API): config, line protocol, writer."""
