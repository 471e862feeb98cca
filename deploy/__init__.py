"""The online completion service: a Ray Serve application (``deploy/app.py``, ``deploy/serve_config.yaml``)."""
