"""The HTTP surfaces a deployment serves from its controller: the FastAPI app (``server``), the
OpenAI API (``openai_protocol`` request types, ``openai_responses`` reply models,
``openai_format`` reply shapes, ``openai_serving``), the native msgpack API (``native_api``, its
codec ``native_wire``), streams tied to a request's life (``streaming``), Prometheus metrics
(``metrics``) and batch jobs (``jobs``, ``job_runner``, ``job_store``)."""
