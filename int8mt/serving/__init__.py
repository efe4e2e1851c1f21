"""Serving and batch translation at scale on Ray: a Ray Serve deployment (``server``) and a Ray Data job
(``batch``), both loading a bundle once per worker. Needs the ``[serve]`` extra."""
