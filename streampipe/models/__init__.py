"""Model lifecycle: signed artifacts, deployment over MQTT, hot swap at the edge, export.

- :mod:`~streampipe.models.keys`: Ed25519 key pairs (``streampipe keys init``).
- :mod:`~streampipe.models.artifact`: the artifact format; signing and verifying.
- :mod:`~streampipe.models.deploy`: ``streampipe deploy`` and ``--rollback``, over MQTT.
- :mod:`~streampipe.models.receive`: the edge side: verify, refuse or hot swap.
- :mod:`~streampipe.models.export`: ``streampipe export-model``, out of a checkpoint.
"""
