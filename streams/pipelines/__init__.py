"""Declarative pipelines: any topic's events through a model, into enriched events.

``settings.py`` (the config model), ``templates.py`` (sandboxed Jinja2), ``schema.py``
(structured output: validation and repair), ``compiled.py`` (a pipeline ready to run and its
worker settings), ``front.py`` (the front stage: event -> request, answer -> enriched event),
``render.py`` (``llm-streams pipeline render``). The worker runs one pipeline per process
(``llm-streams worker --pipeline NAME``) on the same record path as requests.
"""
