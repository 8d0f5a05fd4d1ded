"""The server side: what runs in the supervisor process (ZeroMQ, the fleet of
zygotes, jobs and workers, results). Never imported by a zygote or a worker."""
