"""alexnet-dist: the original AlexNet, trained as a distributed service on Ray, Redis and S3."""

__version__ = "0.1.0"
