"""The HTTP gateway: an OpenAI-compatible API and a live dashboard of one cluster.

It is a client of the cluster like any other (``linguamq.Client``'s machinery): requests go
to the head over MQTT, so it works with the embedded broker and with mosquitto, from any
machine. ``linguamq serve`` runs it alone, ``linguamq hub --http PORT`` beside a hub.
"""
