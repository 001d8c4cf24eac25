"""Configuration: the deploy spec's YAML schema and loading (``spec``, ``schema``, ``errors``),
its resolution into the frozen ``engine.deploy_config.DeploymentConfig`` (``resolve``), and the
``LLM(...)`` keywords that build the same spec (``keywords``). Imports neither Ray nor torch."""
