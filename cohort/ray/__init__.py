"""Everything that touches Ray: joining the cluster and reserving resources (cluster), logit
transports between actors (exchange), live gauges (telemetry), the cohort of student actors
(actors) and Ray Train jobs (train). Nothing outside this package imports Ray, except the
sweep's Tune driver (cohort.sweep), which imports it when a sweep starts."""
