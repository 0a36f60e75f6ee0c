"""fedlora's MNIST toy as a Flower app: ``server_app.app`` and ``client_app.app``."""
