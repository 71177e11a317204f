"""The on-call sink: exceptions from EXCEPTIONS to Alertmanager, PagerDuty and a signed webhook.

Above the engine in the layering (it may import router.engine, router.jetstream and contracts;
the engine never imports it). `router oncall` runs it as a process of its own; `router run` runs
it as a service when `[oncall]` names a target (CONTRACT.md section 8). See router.oncall.worker
for the delivery guarantees and router.oncall.status for what it reports.
"""
