"""Every Redis key and channel name the service uses, under one configurable prefix (default ``alexnet:``).

Keeping them here (as arq does) means a second deployment can share a Redis by choosing another prefix,
and a reader of the code sees the whole data model at once:

| name                    | type        | holds                                                          |
| ----------------------- | ----------- | -------------------------------------------------------------- |
| ``job:{id}``            | hash        | the job record (scalar fields; spec and result as JSON text)    |
| ``queue``               | sorted set  | QUEUED jobs: score = -priority, member = ``{seq:016d}:{id}``,   |
|                         |             | so equal scores sort by submission order (FIFO in a priority)   |
| ``jobs``                | sorted set  | every job id, scored by submission sequence (the index)         |
| ``active``              | set         | jobs in LAUNCHING or RUNNING (what the dispatcher follows)      |
| ``seq``                 | string      | submission counter                                              |
| ``client:{key}``        | string      | job id submitted under a client key (idempotent submit)        |
| ``events:{id}``         | stream      | the job's events: state changes and training metrics (JSON)     |
| ``live:{id}``           | channel     | the same events, pushed as they happen                          |
| ``results``             | channel     | final results of every job (JSON)                               |
| ``dispatcher:lock``     | string      | token of the one active dispatcher, with a TTL                  |
| ``usage``               | hash        | team -> decayed device-seconds; ``.at``: when last decayed      |
| ``throughput``          | hash        | preset:workers:devices -> measured seconds per training step    |
| ``pending``             | hash        | queued job -> why it waits, its position, its ETA (JSON)        |
| ``changes``             | stream      | every job's state changes and results (what webhooks follow)    |
| ``notify:cursor``       | string      | the newest ``changes`` entry every webhook has finished with    |
| ``notify:lock``         | string      | token of the one active webhook follower, with a TTL            |
| ``users``               | hash        | user name -> record (team, admin, token's SHA-256, revoked)      |
| ``tokens``              | hash        | SHA-256 of a live token -> user name (never the token itself)    |
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Keys"]


@dataclass(frozen=True)
class Keys:
    prefix: str = "alexnet:"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def queue(self) -> str:
        return f"{self.prefix}queue"

    @property
    def index(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def active(self) -> str:
        return f"{self.prefix}active"

    @property
    def seq(self) -> str:
        return f"{self.prefix}seq"

    def client(self, client_key: str) -> str:
        return f"{self.prefix}client:{client_key}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    def live(self, job_id: str) -> str:
        return f"{self.prefix}live:{job_id}"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def dispatcher_lock(self) -> str:
        return f"{self.prefix}dispatcher:lock"

    @property
    def changes(self) -> str:
        return f"{self.prefix}changes"

    @property
    def notify_cursor(self) -> str:
        return f"{self.prefix}notify:cursor"

    @property
    def notify_lock(self) -> str:
        return f"{self.prefix}notify:lock"

    @property
    def usage(self) -> str:
        return f"{self.prefix}usage"

    @property
    def pending(self) -> str:
        return f"{self.prefix}pending"

    @property
    def throughput(self) -> str:
        return f"{self.prefix}throughput"

    @property
    def users(self) -> str:
        return f"{self.prefix}users"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}tokens"
