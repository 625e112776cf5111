"""``sandbox serve``: the Sandbox as an HTTP service (needs the ``serve`` extra).

Modules: ``app`` (the FastAPI routes over the public ``Sandbox`` API),
``gate`` (body limit and draining, in front of the app), ``records`` (polled
runs), ``sessions`` (sessions held between requests), ``metrics``
(Prometheus), ``keys`` (API keys), ``main`` (uvicorn, signals, drain).

Must never: reach past the public ``Sandbox`` API into the pool or the
scheduler, or make an outbound request (no callbacks: polling and SSE cover
them).
"""
