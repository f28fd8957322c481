"""Admin alerts to a WeCom group robot (``[notify]``): the sender,
:mod:`connectors.notify.notifier`, and its light config model, :mod:`connectors.notify.config`."""
