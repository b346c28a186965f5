// Package metrics exposes a worker to Prometheus and to health checks:
// per-phase durations, failures by code and lost claims observed from the
// events the lifecycle publishes (a decorator of its Publisher),
// redeliveries from settlements, and slots, machines, queues, host state
// and connection states read from the worker when scraped. Handler serves
// /metrics, /healthz and /readyz.
//
// Labels are phase, image, code, consumer, pool, state and op; never a
// job id, and image only for the images the host carries (any other is
// _other), so the number of series stays bounded by the host's images
// whatever images requests name.
package metrics
