"""Fleet learning: edges share model updates (never readings); an aggregator merges them.

``params`` turns a federable River model into plain numbers and merges them; ``update``
is the message an edge publishes; ``aggregator`` combines the latest update of each edge
(staleness-discounted, robust to a bad edge); ``service`` runs it over MQTT and publishes
the signed fleet model.
"""

#: The rules ``streampipe aggregate --rule`` offers (here, so that the command line does
#: not import River to list them).
RULES: tuple[str, ...] = ("auto", "mean", "trimmed-mean", "median")
