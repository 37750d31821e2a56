"""The service's front door: an HTTP API and web dashboard over the job store, and the client the CLI
uses when ``ALEXNET_DIST_SERVER`` is set.

- ``auth``: who a request comes from (a bearer token or the dashboard's cookie), and CSRF tokens;
- ``server``: the FastAPI application (``create_app``), stateless, so several can serve one store;
- ``dashboard``: the web pages (the queue, a job's page, the login) and their static files;
- ``client``: the HTTP client with :class:`~alexnet_dist.service.operations.JobService`'s methods.

``client`` imports neither FastAPI nor torch, so the CLI stays fast.
"""
