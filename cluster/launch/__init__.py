"""Putting a deployment on Ray: joining Ray (``ray_env``), placing the workers and the router
(``deployment``), the adapters through which the router calls the worker actors
(``ray_ports``), and the controller actor that serves HTTP for a deployment (``controller``)."""
